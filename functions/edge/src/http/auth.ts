import type { Context, MiddlewareHandler } from "hono";
import { ApiError } from "./errors.ts";

/**
 * Bearer API keys from the `API_KEYS` secret (comma-separated). Keys are compared as SHA-256 digests
 * with `crypto.subtle.timingSafeEqual`, so neither the length nor the content of a key leaks through
 * timing. With no keys configured every request is refused (fail closed).
 */
export function bearerAuth(getKeys: (c: Context) => string | undefined): MiddlewareHandler {
  let cached: { source: string; digests: ArrayBuffer[] } | undefined;
  return async (c, next) => {
    const source = getKeys(c) ?? "";
    if (cached?.source !== source) {
      const list = source
        .split(",")
        .map((k) => k.trim())
        .filter(Boolean);
      cached = { source, digests: await Promise.all(list.map(digest)) };
    }
    const header = c.req.header("authorization") ?? "";
    const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
    if (!match) throw new ApiError(401, "unauthorized", "Send an API key as 'Authorization: Bearer <key>'.", { "www-authenticate": 'Bearer realm="edgetune"' });
    const presented = await digest(match[1] as string);
    let ok = false;
    for (const d of cached.digests) if (timingSafeEqual(d, presented)) ok = true;
    if (!ok) throw new ApiError(401, "unauthorized", "The API key is not valid.", { "www-authenticate": 'Bearer realm="edgetune", error="invalid_token"' });
    await next();
  };
}

function digest(s: string): Promise<ArrayBuffer> {
  return crypto.subtle.digest("SHA-256", new TextEncoder().encode(s));
}

function timingSafeEqual(a: ArrayBuffer, b: ArrayBuffer): boolean {
  const subtle = crypto.subtle as SubtleCrypto & { timingSafeEqual?: (a: ArrayBuffer, b: ArrayBuffer) => boolean };
  if (subtle.timingSafeEqual) return subtle.timingSafeEqual(a, b);
  // Fallback (not workerd): constant-time over equal-length digests.
  const x = new Uint8Array(a);
  const y = new Uint8Array(b);
  let diff = x.length ^ y.length;
  for (let i = 0; i < x.length; i++) diff |= (x[i] as number) ^ (y[i] as number);
  return diff === 0;
}
