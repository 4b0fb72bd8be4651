import { hashDistance } from "../../../../shared/image/input-hash.ts";

/**
 * Near-identical images across the split: a held-out image that is a resized copy, a re-encode, a
 * slightly shifted crop or the next frame of a burst of a training image makes the held-out accuracy
 * flatter the model; such held-out images are left out of the evaluation (same-label pairs only, never
 * more than half of a label's held-out images: `separateNearDuplicates`). Two signals, both from what
 * feature extraction already computed (no second decode):
 *
 * 1. A difference hash of the model's view-0 input (shared/image/input-hash.ts), at most
 *    `NEAR_DUPLICATE_BITS` bits apart — resized, re-encoded and brightened copies;
 * 2. the cosine of the mean-centred pooled features (view 0), at least `NEAR_DUPLICATE_COSINE` — crops
 *    and shifts, which move the hash by 5–24 bits.
 *
 * Measured with `npm run bench:near-duplicates` (bench/RESULTS.md): on 120 hymenoptera photos no
 * distinct pair was flagged (hashes at least 15 bits apart, cosines at most 0.81) and 149 of 150 edits
 * were; on 120 Twemoji icons 2 of 7 140 distinct pairs were flagged (cosine 0.90; hashes at least 9 bits
 * apart) and 123 of 150 edits (a 60 %-size or quality-40 copy of a 128 px icon moves its hash by up to
 * 12 bits and its features a lot).
 *
 * Candidates come from banding, so the cost grows with the number of images, not its square: the 64-bit
 * hash in 8 bands of 8 bits (two hashes within 7 bits share a band, by pigeonhole: exact), the features
 * by sign random projections (24 bands of 8 bits, seeded; at cosine 0.85 a pair shares a band with
 * probability 0.996). Every candidate is then checked exactly.
 */
export const NEAR_DUPLICATE_BITS = 6;
export const NEAR_DUPLICATE_COSINE = 0.85;
const BANDS = 24;
const BITS = 8;

export interface NearDuplicate {
  /** The held-out image. */
  val: string;
  /** Its near-identical training image. */
  train: string;
  /** What matched: the input hashes (bits apart) or the features (cosine). */
  by: "hash" | "features";
  similarity: number;
}

export interface LabelledImage {
  id: string;
  key: string;
  label: string;
}

/**
 * The held-out images to leave out of the evaluation, with the training image each copies, and warnings.
 * Only pairs of the same label count: a held-out image close to a training image of another label is a
 * hard case (or a labelling question), not a flattering one, and stays. A label that would lose more than
 * half of its held-out images loses none (a warning says so): a near-duplicate rule that empties a label's
 * evaluation (a fixed camera, an "empty scene" class) would cost more than it protects.
 */
export function separateNearDuplicates(
  train: readonly LabelledImage[],
  val: readonly LabelledImage[],
  vectorOf: (id: string) => Float32Array | undefined,
  hashOf: (id: string) => string | undefined,
): { dropped: (NearDuplicate & { valKey: string; trainKey: string })[]; warnings: string[] } {
  const keyOf = new Map([...train, ...val].map((i) => [i.id, i.key]));
  const labels = [...new Set(val.map((i) => i.label))].sort();
  const dropped: (NearDuplicate & { valKey: string; trainKey: string })[] = [];
  const warnings: string[] = [];
  const side = (images: readonly LabelledImage[]) => ({
    vectors: new Map(images.flatMap((i) => (vectorOf(i.id) ? [[i.id, vectorOf(i.id) as Float32Array] as const] : []))),
    hashes: new Map(images.flatMap((i) => (informative(hashOf(i.id)) ? [[i.id, hashOf(i.id) as string] as const] : []))),
  });
  for (const label of labels) {
    const heldOut = val.filter((i) => i.label === label);
    const found = nearDuplicates(side(train.filter((i) => i.label === label)), side(heldOut));
    if (found.length * 2 > heldOut.length) {
      warnings.push(
        `${found.length} of ${heldOut.length} held-out images of ${label} look like copies of training images; kept, so the held-out accuracy of ${label} may flatter the model`,
      );
      continue;
    }
    dropped.push(...found.map((d) => ({ ...d, valKey: keyOf.get(d.val) as string, trainKey: keyOf.get(d.train) as string })));
  }
  return { dropped, warnings };
}

/** A hash with almost no edges (a blank or uniform image) says nothing: every such image would match every other. */
function informative(hash: string | undefined): hash is string {
  if (!hash) return false;
  let ones = 0;
  for (let i = 0; i < hash.length; i += 2) {
    let x = Number.parseInt(hash.slice(i, i + 2), 16);
    while (x) {
      ones += x & 1;
      x >>= 1;
    }
  }
  return ones > 2 && ones < 62;
}

/** Held-out ids near-identical to a training image, by either signal (hash first). */
export function nearDuplicates(
  train: { vectors: ReadonlyMap<string, Float32Array>; hashes: ReadonlyMap<string, string> },
  val: { vectors: ReadonlyMap<string, Float32Array>; hashes: ReadonlyMap<string, string> },
): NearDuplicate[] {
  const byHash = nearDuplicatesByHash(train.hashes, val.hashes);
  const found = new Set(byHash.map((d) => d.val));
  const rest = new Map([...val.vectors].filter(([id]) => !found.has(id)));
  return [...byHash, ...nearDuplicatesAcross(train.vectors, rest)];
}

/** Held-out ids whose input hash is within `maxBits` of a training image's. */
export function nearDuplicatesByHash(train: ReadonlyMap<string, string>, val: ReadonlyMap<string, string>, maxBits = NEAR_DUPLICATE_BITS): NearDuplicate[] {
  const bands = new Map<string, string[]>();
  for (const [id, hash] of train) {
    for (let b = 0; b < 8; b++) {
      const key = `${b}:${hash.slice(b * 2, b * 2 + 2)}`;
      const list = bands.get(key);
      if (list) list.push(id);
      else bands.set(key, [id]);
    }
  }
  const out: NearDuplicate[] = [];
  for (const [id, hash] of val) {
    let best = { train: "", bits: 65 };
    const seen = new Set<string>();
    for (let b = 0; b < 8; b++) {
      for (const t of bands.get(`${b}:${hash.slice(b * 2, b * 2 + 2)}`) ?? []) {
        if (seen.has(t)) continue;
        seen.add(t);
        const bits = hashDistance(hash, train.get(t) as string);
        if (bits < best.bits) best = { train: t, bits };
      }
    }
    if (best.bits <= maxBits) out.push({ val: id, train: best.train, by: "hash", similarity: best.bits });
  }
  return out;
}

/** Held-out ids whose centred pooled features are within `threshold` cosine of a training image's. */
export function nearDuplicatesAcross(
  train: ReadonlyMap<string, Float32Array>,
  val: ReadonlyMap<string, Float32Array>,
  threshold = NEAR_DUPLICATE_COSINE,
  seed = 7,
): NearDuplicate[] {
  const all = [...train.values(), ...val.values()];
  if (train.size === 0 || val.size === 0) return [];
  const dim = (all[0] as Float32Array).length;
  const mean = new Float64Array(dim);
  for (const v of all) for (let i = 0; i < dim; i++) mean[i] = (mean[i] as number) + (v[i] as number) / all.length;
  const unit = (v: Float32Array) => {
    const u = new Float32Array(dim);
    let norm = 0;
    for (let i = 0; i < dim; i++) {
      const x = (v[i] as number) - (mean[i] as number);
      u[i] = x;
      norm += x * x;
    }
    norm = Math.sqrt(norm) || 1;
    for (let i = 0; i < dim; i++) u[i] = (u[i] as number) / norm;
    return u;
  };
  const planes = gaussianPlanes(BANDS * BITS, dim, seed);
  const signature = (u: Float32Array) => {
    const bands: number[] = [];
    for (let b = 0; b < BANDS; b++) {
      let key = 0;
      for (let k = 0; k < BITS; k++) {
        const plane = planes[b * BITS + k] as Float32Array;
        let dot = 0;
        for (let i = 0; i < dim; i++) dot += (plane[i] as number) * (u[i] as number);
        key = (key << 1) | (dot >= 0 ? 1 : 0);
      }
      bands.push(b * 256 + key);
    }
    return bands;
  };
  const trainUnits = new Map<string, Float32Array>();
  const buckets = new Map<number, string[]>();
  for (const [id, v] of train) {
    const u = unit(v);
    trainUnits.set(id, u);
    for (const key of signature(u)) {
      const list = buckets.get(key);
      if (list) list.push(id);
      else buckets.set(key, [id]);
    }
  }
  const out: NearDuplicate[] = [];
  for (const [id, v] of val) {
    const u = unit(v);
    const seen = new Set<string>();
    let best = { train: "", cosine: -1 };
    for (const key of signature(u)) {
      for (const t of buckets.get(key) ?? []) {
        if (seen.has(t)) continue;
        seen.add(t);
        const w = trainUnits.get(t) as Float32Array;
        let dot = 0;
        for (let i = 0; i < dim; i++) dot += (u[i] as number) * (w[i] as number);
        if (dot > best.cosine) best = { train: t, cosine: dot };
      }
    }
    if (best.cosine >= threshold) out.push({ val: id, train: best.train, by: "features", similarity: best.cosine });
  }
  return out;
}

/** `n` random directions in `dim` dimensions (Box–Muller over a seeded xorshift generator). */
function gaussianPlanes(n: number, dim: number, seed: number): Float32Array[] {
  let state = seed >>> 0 || 1;
  const uniform = () => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return ((state >>> 0) + 0.5) / 4294967296;
  };
  return Array.from({ length: n }, () => {
    const p = new Float32Array(dim);
    for (let i = 0; i < dim; i++) p[i] = Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
    return p;
  });
}
