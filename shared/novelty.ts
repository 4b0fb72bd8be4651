/**
 * "None of these" without a none-of-these folder: is the image like the labels' training images at all?
 * A softmax over five flowers has no way to say "not a flower" — it spreads its mass over the five — but
 * the pooled features the head reads do. Each real label keeps one direction, the mean of its training
 * images' L2-normalised pooled features (normalised again); an image's similarity is the cosine of its
 * own features to the nearest of them (a nearest-class-mean rule, Mensink et al. 2013, used as a
 * rejection score). Below the version's floor (fitted at training on the held-out images of the labels:
 * the directions in jobs/train/src/fit/novelty.ts, the floor in jobs/train/src/release/answers.ts) the
 * answer is "none of these".
 *
 * Chosen by measurement (bench/RESULTS.md, "Rejection scores side by side"): on the three reference
 * datasets, foreign images against held-out images, its AUROC is 0.94 / 0.94 / 1.00 where max-softmax
 * gives 0.81 / 0.94 / 0.46; the standardised variant, an energy score and a low-rank Mahalanobis distance
 * each lose somewhere. Its cost at the edge: C × D numbers beside the head and one pass over them.
 *
 * Both sides compute it with this file: the training job on held-out and out-of-distribution images,
 * the worker on every answer.
 */

/** The exported classifier's layer that outputs the pooled features (the head's input). */
export const POOL_LAYER = "edgetune_pool";

/** The version file holding the labels' mean directions: float32 little-endian, one row of `features` per real label. */
export const CLASS_MEANS_FILE = "class-means.bin";

/** Euclidean length; 0 for the zero vector. */
function norm(v: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < v.length; i++) s += (v[i] as number) ** 2;
  return Math.sqrt(s);
}

/**
 * Cosine of `features` to the nearest row of `means` (rows of unit length, `features.length` wide), at most 1
 * (float32 rounding could say 1 + 1e-7). A zero vector is orthogonal to everything: 0, as the ONNX export's
 * LpNormalization gives; features that are not numbers are like nothing: −1 (never a label by accident).
 */
export function similarity(features: ArrayLike<number>, means: Float32Array): number {
  const dim = features.length;
  const n = norm(features);
  if (dim === 0 || means.length % dim !== 0 || Number.isNaN(n)) return -1;
  if (n === 0) return 0;
  let best = -1;
  for (let offset = 0; offset < means.length; offset += dim) {
    let dot = 0;
    for (let i = 0; i < dim; i++) dot += (features[i] as number) * (means[offset + i] as number);
    best = Math.max(best, dot / n);
  }
  return Number.isNaN(best) ? -1 : Math.min(1, best);
}

/**
 * Accumulates the labels' mean directions one feature vector at a time (training streams its rows
 * through it: nothing of the dataset is held). Rows of classes not in `classes` (the rejection class) are ignored.
 */
export class ClassMeans {
  /** Class indices that get a direction, in output order (every label but the rejection class). */
  readonly classes: readonly number[];
  readonly dim: number;
  private readonly sums: Float64Array;
  private readonly counts: number[];
  constructor(classes: readonly number[], dim: number) {
    this.classes = classes;
    this.dim = dim;
    this.sums = new Float64Array(classes.length * dim);
    this.counts = classes.map(() => 0);
  }

  add(features: ArrayLike<number>, cls: number): void {
    const row = this.classes.indexOf(cls);
    const n = norm(features);
    if (row === -1 || n === 0) return;
    const offset = row * this.dim;
    for (let i = 0; i < this.dim; i++) this.sums[offset + i] = (this.sums[offset + i] as number) + (features[i] as number) / n;
    this.counts[row] = (this.counts[row] as number) + 1;
  }

  /** How many rows each class direction was made from, in `classes` order. */
  get support(): readonly number[] {
    return this.counts;
  }

  /** The directions, each of unit length (a class without rows stays zero: nothing is similar to it). */
  means(): Float32Array {
    const out = new Float32Array(this.sums.length);
    for (let r = 0; r < this.classes.length; r++) {
      const row = this.sums.subarray(r * this.dim, (r + 1) * this.dim);
      const n = norm(row) || 1;
      for (let i = 0; i < this.dim; i++) out[r * this.dim + i] = (row[i] as number) / n;
    }
    return out;
  }
}

/** The file's bytes (little-endian float32, as typed arrays are on every platform edgetune runs on). */
export function classMeansBytes(means: Float32Array): Uint8Array {
  return new Uint8Array(means.buffer.slice(means.byteOffset, means.byteOffset + means.byteLength));
}

/** The file read back, checked against what the metadata says it holds (`rows` × `features` float32). */
export function readClassMeans(bytes: Uint8Array, rows: number, features: number): Float32Array {
  if (bytes.byteLength !== rows * features * 4)
    throw new Error(`${CLASS_MEANS_FILE} holds ${bytes.byteLength} bytes, not the ${rows} × ${features} float32 its metadata says`);
  const out = new Float32Array(rows * features);
  new Uint8Array(out.buffer).set(bytes);
  for (const v of out) if (!Number.isFinite(v)) throw new Error(`${CLASS_MEANS_FILE} holds a value that is not a finite number`);
  return out;
}

/**
 * A version's directions from its files (as read and verified against its metadata), checked against what
 * its metadata says; undefined for a version without a novelty floor.
 */
export function versionClassMeans(
  metadata: { novelty?: { rows: number; features: number } | undefined },
  files: ReadonlyMap<string, Uint8Array>,
): Float32Array | undefined {
  const n = metadata.novelty;
  if (!n) return undefined;
  const bytes = files.get(CLASS_MEANS_FILE);
  if (!bytes) throw new Error(`the version has a novelty floor but no ${CLASS_MEANS_FILE}`);
  return readClassMeans(bytes, n.rows, n.features);
}

/** The similarity below which the share `reject` of `heldOut` falls (the in-distribution images' own similarities). */
export function similarityFloor(heldOut: readonly number[], reject: number): number {
  if (heldOut.length === 0 || reject <= 0) return -1;
  const sorted = [...heldOut].sort((a, b) => a - b);
  // The lowest value not rejected: rejecting below it rejects floor(reject · n) images (ties aside).
  return sorted[Math.min(sorted.length - 1, Math.floor(reject * sorted.length))] as number;
}
