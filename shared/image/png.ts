/**
 * The chunk structure of a PNG, walked without decoding. Used where only an image that provably carries
 * nothing but pixels may pass: the edge's captures are encoded as IHDR, (PLTE), IDAT…, IEND and nothing
 * after it, so anything else under captures/ was not written by the edge's encoder.
 */
const SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

/** The chunk types in order, or null when `bytes` is not a PNG or a chunk runs past the end; `trailing`: bytes after IEND. */
export function pngChunks(bytes: Uint8Array): { types: string[]; trailing: number } | null {
  if (bytes.length < SIGNATURE.length || SIGNATURE.some((b, i) => bytes[i] !== b)) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const types: string[] = [];
  let at = SIGNATURE.length;
  while (at + 12 <= bytes.length) {
    const length = view.getUint32(at);
    const type = String.fromCharCode(...bytes.subarray(at + 4, at + 8));
    const end = at + 12 + length; // length, type, data, CRC
    if (end > bytes.length) return null;
    types.push(type);
    at = end;
    if (type === "IEND") return { types, trailing: bytes.length - at };
  }
  return null; // no IEND
}

/** True for IHDR, an optional PLTE, one run of IDAT, IEND, and not a byte after it: the edge's own output. */
export function isBarePng(bytes: Uint8Array): boolean {
  const png = pngChunks(bytes);
  return png?.trailing === 0 && /^IHDR,(PLTE,)?(IDAT,)+IEND$/.test(png.types.join(","));
}
