/** sha256 with WebCrypto, available both in Node and in workerd. */
export async function sha256Hex(data: ArrayBuffer | Uint8Array | string): Promise<string> {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const digest = await crypto.subtle.digest("SHA-256", bytes as BufferSource);
  return hex(new Uint8Array(digest));
}

/** HMAC-SHA256 of `message` under `key`, hex, with WebCrypto: the worker signs review decisions with it, the job verifies them. */
export async function hmacSha256Hex(key: string, message: string): Promise<string> {
  const k = await crypto.subtle.importKey("raw", new TextEncoder().encode(key), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return hex(new Uint8Array(await crypto.subtle.sign("HMAC", k, new TextEncoder().encode(message))));
}

export function hex(bytes: Uint8Array): string {
  let s = "";
  for (const b of bytes) s += b.toString(16).padStart(2, "0");
  return s;
}

/**
 * True when `signature` (64 lower-case hex) is the HMAC-SHA256 of `message` under one of `keys`. WebCrypto's
 * verify compares in constant time, in Node (the job) and workerd (the worker) alike, and every key is tried
 * whatever the first ones answered, so the time does not say which key signed.
 */
export async function signedWithAny(signature: string | undefined, message: string, keys: readonly string[]): Promise<boolean> {
  if (!signature || !/^[0-9a-f]{64}$/.test(signature)) return false;
  const presented = Uint8Array.from(signature.match(/../g) as string[], (h) => Number.parseInt(h, 16));
  const data = new TextEncoder().encode(message);
  let ok = false;
  for (const key of keys) {
    const k = await crypto.subtle.importKey("raw", new TextEncoder().encode(key), { name: "HMAC", hash: "SHA-256" }, false, ["verify"]);
    if (await crypto.subtle.verify("HMAC", k, presented, data)) ok = true;
  }
  return ok;
}
