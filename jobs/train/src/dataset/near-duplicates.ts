import { hashDistance } from "#shared/image/input-hash.ts";

/**
 * Near-identical images across the split: a held-out image that is a resized copy or a re-encode of a
 * training image makes the held-out accuracy flatter the model; such held-out images are left out of the
 * evaluation (same-label pairs only, never more than half of a label's held-out images:
 * `separateNearDuplicates`). The signal is a difference hash of the model's view-0 input
 * (shared/image/input-hash.ts), computed during feature extraction (no second decode), at most
 * `NEAR_DUPLICATE_BITS` bits apart.
 *
 * The threshold is set by looking at what it catches on a real dataset, not only by the synthetic edits of
 * `npm run bench:near-duplicates` (bench/RESULTS.md): on flowers128 (160 px) the pairs within 0–2 bits were
 * all the same photo (Flickr's small and large copies of one picture), while pairs at 3–6 bits were
 * different photos of similar scenes (tulip fields, dandelion heads). A first version also used the cosine
 * of centred pooled features (≥ 0.85, chosen on hymenoptera edits); on flowers it flagged 87 pairs, the
 * closest at 0.96 still two different tulip fields: features say "similar", not "the same photo", so they
 * are not used. At 2 bits the hash catches resized and re-encoded copies (90th percentile within 2 bits on
 * photos), not crops or shifts.
 *
 * Candidates come from banding, so the cost grows with the number of images, not its square: the 64-bit
 * hash in 8 bands of 8 bits (two hashes within 7 bits share a band, by pigeonhole: exact); every candidate
 * is then checked exactly.
 */
export const NEAR_DUPLICATE_BITS = 2;

export interface NearDuplicate {
  /** The held-out image. */
  val: string;
  /** Its near-identical training image. */
  train: string;
  /** Bits apart. */
  bits: number;
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
 * half of its held-out images loses none (a warning says so): a rule that empties a label's evaluation
 * would cost more than it protects.
 */
export function separateNearDuplicates(
  train: readonly LabelledImage[],
  val: readonly LabelledImage[],
  hashOf: (id: string) => string | undefined,
): { dropped: (NearDuplicate & { valKey: string; trainKey: string })[]; warnings: string[] } {
  const keyOf = new Map([...train, ...val].map((i) => [i.id, i.key]));
  const hashes = (images: readonly LabelledImage[]) =>
    new Map(images.flatMap((i) => (informative(hashOf(i.id)) ? [[i.id, hashOf(i.id) as string] as const] : [])));
  const dropped: (NearDuplicate & { valKey: string; trainKey: string })[] = [];
  const warnings: string[] = [];
  for (const label of [...new Set(val.map((i) => i.label))].sort()) {
    const heldOut = val.filter((i) => i.label === label);
    const found = nearDuplicatesByHash(hashes(train.filter((i) => i.label === label)), hashes(heldOut));
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

/** Held-out ids whose input hash is within `maxBits` of a training image's (the closest one). */
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
    if (best.bits <= maxBits) out.push({ val: id, train: best.train, bits: best.bits });
  }
  return out;
}
