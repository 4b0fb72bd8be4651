/**
 * Embedding packs: the cache of features that makes retraining cost what the new images cost.
 * One pack holds the features of up to a few hundred images (every augmented view of each), stored
 * as float16, plus the images that could not be decoded (so they are not fetched again).
 *
 * Layout: "ETP1" | u32 header length | header JSON | float16 values, entry after entry.
 */
export interface PackEntry {
  id: string;
  view: number;
  values: Float32Array;
}
export interface Pack {
  shape: number[];
  entries: PackEntry[];
  failed: { id: string; key: string; reason: string }[];
  /** Image id → dHash of its view-0 input (shared/image/input-hash.ts); absent in packs written before it. */
  hashes?: Record<string, string>;
}

const MAGIC = [0x45, 0x54, 0x50, 0x31];

export function encodePack(pack: Pack): Uint8Array {
  const dim = pack.shape.reduce((a, b) => a * b, 1);
  const hashes = pack.hashes && Object.keys(pack.hashes).length > 0 ? { hashes: pack.hashes } : {};
  const header = new TextEncoder().encode(
    JSON.stringify({ shape: pack.shape, entries: pack.entries.map((e) => [e.id, e.view]), failed: pack.failed, ...hashes }),
  );
  const out = new Uint8Array(8 + header.byteLength + pack.entries.length * dim * 2);
  out.set(MAGIC, 0);
  new DataView(out.buffer).setUint32(4, header.byteLength, true);
  out.set(header, 8);
  const values = new DataView(out.buffer, 8 + header.byteLength);
  let o = 0;
  for (const e of pack.entries) {
    if (e.values.length !== dim) throw new Error(`pack entry ${e.id} has ${e.values.length} values, expected ${dim}`);
    for (let i = 0; i < dim; i++, o += 2) values.setFloat16(o, e.values[i] as number, true);
  }
  return out;
}

export interface PackHeader {
  shape: number[];
  /** [image id, view] per entry, in the order of the values. */
  entries: [string, number][];
  failed: Pack["failed"];
  hashes?: Record<string, string>;
  headerLength: number;
}

/** The header only (which images and views, their shape), checked against the pack's length. */
export function decodePackHeader(bytes: Uint8Array): PackHeader {
  if (bytes.byteLength < 8 || MAGIC.some((m, i) => bytes[i] !== m)) throw new Error("not an embedding pack");
  const headerLength = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(4, true);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength))) as Omit<PackHeader, "headerLength">;
  const dim = header.shape.reduce((a, b) => a * b, 1);
  if (bytes.byteLength !== 8 + headerLength + header.entries.length * dim * 2) throw new Error("embedding pack is truncated");
  return { ...header, headerLength };
}

export function decodePack(bytes: Uint8Array): Pack {
  const header = decodePackHeader(bytes);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const dim = header.shape.reduce((a, b) => a * b, 1);
  let o = 8 + header.headerLength;
  const entries = header.entries.map(([id, v]) => {
    const values = new Float32Array(dim);
    for (let i = 0; i < dim; i++, o += 2) values[i] = view.getFloat16(o, true);
    return { id, view: v, values };
  });
  return { shape: header.shape, entries, failed: header.failed, hashes: header.hashes };
}
