import { concatBytes } from "#shared/bytes.ts";

/**
 * A response body of at most `maxBytes`: refused by its Content-Length when it says more, else cut off as
 * soon as the stream passes it, so the isolate (which holds the loaded models) never holds more than was
 * asked. `tooLarge` is the caller's error: model files and captures report it differently.
 */
export async function readCappedBody(res: Response, maxBytes: number, tooLarge: () => Error): Promise<Uint8Array> {
  if (Number(res.headers.get("content-length") ?? 0) > maxBytes) {
    await res.body?.cancel();
    throw tooLarge();
  }
  if (!res.body) return new Uint8Array(0);
  const chunks: Uint8Array[] = [];
  let total = 0;
  const reader = res.body.getReader();
  for (let r = await reader.read(); !r.done; r = await reader.read()) {
    total += r.value.byteLength;
    if (total > maxBytes) {
      await reader.cancel();
      throw tooLarge();
    }
    chunks.push(r.value);
  }
  return concatBytes(chunks);
}
