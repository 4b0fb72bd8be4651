import * as tf from "@tensorflow/tfjs";
import { similarity } from "#shared/novelty.ts";
import { mulberry32 } from "../jobs/train/src/dataset/augment.ts";

/**
 * Candidate rejection scores for "is this image one of the labels at all?", each higher for an image
 * less like the training images, all cheap enough for a head at the edge (a few class-sized vectors,
 * no per-image training data):
 *  - `msp`: 1 − the best label's (calibrated) softmax score, what the answer uses today (Hendrycks &
 *    Gimpel 2017, the baseline);
 *  - `energy`: −logsumexp of the labels' logits (Liu et al. 2020): the softmax without its normalisation;
 *  - `cosine`: 1 − the cosine similarity of the image's standardised pooled features to the nearest
 *    class mean (a nearest-class-mean classifier's confidence; C × D numbers);
 *  - `pca`: the Mahalanobis distance to the nearest class mean in the top-k principal components of the
 *    standardised training features, with one shared covariance (Lee et al. 2018, made low-rank: the full
 *    D × D covariance is too big for a head; k × D numbers);
 *  - `knn5`: 1 − the cosine similarity to the 5th nearest training image's standardised features (Sun et
 *    al. 2022): for comparison only, as it needs every training image's features at the edge;
 *  - `novelty`: what the version itself answers with (shared/novelty.ts): 1 − the cosine of the raw pooled
 *    features, L2-normalised, to the nearest label's mean direction, with the directions the training
 *    job fitted on every training image (its class-means.bin).
 * Fitted on the training split's features only; measured by the benchmark (calibration.ts).
 */
type Vec = Float64Array<ArrayBufferLike>;

export const SCORES = ["msp", "energy", "cosine", "pca", "knn5", "novelty"] as const;
export type ScoreName = (typeof SCORES)[number];

export interface Scored {
  /** Pooled features (what the head takes). */
  features: Float32Array;
  /** The logits layer's pre-softmax values (temperature folded in). */
  logits: Float32Array;
  probs: Float32Array;
}

/** The exported classifier with its pooled features and logits exposed beside its softmax. */
export function probeModel(model: tf.LayersModel): (x: tf.Tensor4D) => Promise<Scored[]> {
  const logitsLayer = model.getLayer("edgetune_logits");
  const probe = tf.model({
    inputs: model.inputs,
    outputs: [model.getLayer("edgetune_pool").output as tf.SymbolicTensor, logitsLayer.input as tf.SymbolicTensor],
  });
  const [kernel, bias] = logitsLayer.getWeights() as [tf.Tensor2D, tf.Tensor1D];
  return async (x) => {
    const [f, l, p] = tf.tidy(() => {
      const [features, hidden] = probe.predict(x) as [tf.Tensor2D, tf.Tensor2D];
      const logits = tf.add(tf.matMul(hidden, kernel), bias) as tf.Tensor2D;
      return [features, logits, tf.softmax(logits)];
    });
    const rows = (t: tf.Tensor2D, data: Float32Array) => Array.from({ length: t.shape[0] }, (_, r) => data.slice(r * t.shape[1], (r + 1) * t.shape[1]));
    const [fd, ld, pd] = [(await f.data()) as Float32Array, (await l.data()) as Float32Array, (await p.data()) as Float32Array];
    const out = rows(f, fd).map((features, r) => ({ features, logits: rows(l, ld)[r] as Float32Array, probs: rows(p, pd)[r] as Float32Array }));
    tf.dispose([f, l, p]);
    return out;
  };
}

/** A fitted set of scores: `score(x)` for each candidate, `real` the label indices that count (not the rejection class). */
export function fitScores(
  train: readonly Scored[],
  truth: readonly number[],
  real: readonly number[],
  versionMeans: Float32Array | undefined,
  k = 32,
): (s: Scored) => Record<ScoreName, number> {
  const dim = (train[0] as Scored).features.length;
  // Standardisation per feature over the training rows (as the head's).
  const mean = new Float64Array(dim);
  const sd = new Float64Array(dim);
  for (const t of train) for (let i = 0; i < dim; i++) mean[i] = (mean[i] as number) + (t.features[i] as number) / train.length;
  for (const t of train) for (let i = 0; i < dim; i++) sd[i] = (sd[i] as number) + ((t.features[i] as number) - (mean[i] as number)) ** 2 / train.length;
  for (let i = 0; i < dim; i++) sd[i] = Math.sqrt(sd[i] as number) + 1e-6;
  const z = (f: Float32Array) => Float64Array.from(f, (v, i) => (v - (mean[i] as number)) / (sd[i] as number));
  const zs = train.map((t) => z(t.features));
  const rows = (c: number) => zs.filter((_, r) => truth[r] === c);
  const classMean = (vs: Vec[], d: number) => {
    const m = new Float64Array(d);
    for (const v of vs) for (let i = 0; i < d; i++) m[i] = (m[i] as number) + (v[i] as number) / vs.length;
    return m;
  };
  const means = real.map((c) => classMean(rows(c), dim));
  const unit = (v: Vec) => {
    const n = Math.sqrt(v.reduce((a, x) => a + x * x, 0)) || 1;
    return v.map((x) => x / n);
  };
  const unitMeans = means.map(unit);
  const unitTrain = zs.map(unit);
  // Low-rank Mahalanobis: the top-k principal directions of the training features (subspace iteration).
  const kk = Math.min(k, zs.length - 1, dim);
  const basis = principalDirections(zs, kk);
  const project = (v: Vec) => basis.map((b) => b.reduce((a, x, i) => a + x * (v[i] as number), 0));
  const projected = zs.map((v) => Float64Array.from(project(v)));
  const pMeans = real.map((c) =>
    classMean(
      projected.filter((_, r) => truth[r] === c),
      kk,
    ),
  );
  // Shared within-class covariance in the k dimensions, inverted (k × k).
  const cov = Array.from({ length: kk }, () => new Float64Array(kk));
  let n = 0;
  real.forEach((c, j) => {
    projected.forEach((p, r) => {
      if (truth[r] !== c) return;
      n++;
      const m = pMeans[j] as Vec;
      for (let a = 0; a < kk; a++)
        for (let b = 0; b < kk; b++)
          (cov[a] as Vec)[b] = (cov[a]?.[b] as number) + ((p[a] as number) - (m[a] as number)) * ((p[b] as number) - (m[b] as number));
    });
  });
  for (let a = 0; a < kk; a++) for (let b = 0; b < kk; b++) (cov[a] as Vec)[b] = (cov[a]?.[b] as number) / Math.max(1, n) + (a === b ? 1e-3 : 0);
  const precision = invert(cov);
  return (s) => {
    const maxP = Math.max(...real.map((c) => s.probs[c] as number));
    const lse = logSumExp(real.map((c) => s.logits[c] as number));
    const v = z(s.features);
    const u = unit(v);
    const cos = Math.max(...unitMeans.map((m) => m.reduce((a, x, i) => a + x * (u[i] as number), 0)));
    const p = project(v);
    const maha = Math.min(
      ...pMeans.map((m) => {
        const d = p.map((x, i) => x - (m[i] as number));
        let q = 0;
        for (let a = 0; a < kk; a++) for (let b = 0; b < kk; b++) q += (d[a] as number) * (precision[a]?.[b] as number) * (d[b] as number);
        return q;
      }),
    );
    const sims = unitTrain.map((t) => t.reduce((a, x, i) => a + x * (u[i] as number), 0)).sort((a, b) => b - a);
    return {
      msp: 1 - maxP,
      energy: -lse,
      cosine: 1 - cos,
      pca: maha,
      knn5: 1 - (sims[Math.min(4, sims.length - 1)] as number),
      novelty: versionMeans ? 1 - similarity(s.features, versionMeans) : Number.NaN,
    };
  };
}

function logSumExp(xs: number[]): number {
  const m = Math.max(...xs);
  return m + Math.log(xs.reduce((a, x) => a + Math.exp(x - m), 0));
}

/** The top-k principal directions of (already centred) rows: 40 rounds of subspace iteration, Gram–Schmidt each round. */
function principalDirections(rows: readonly Vec[], k: number): Vec[] {
  const dim = (rows[0] as Vec).length;
  const rand = mulberry32(3);
  let q: Vec[] = Array.from({ length: k }, () => Float64Array.from({ length: dim }, () => rand() - 0.5));
  q = orthonormal(q);
  const x = tf.tensor2d(
    rows.flatMap((r) => Array.from(r)),
    [rows.length, dim],
  );
  for (let round = 0; round < 40; round++) {
    const next = tf.tidy(() => {
      const qt = tf.tensor2d(
        q.flatMap((v) => Array.from(v)),
        [k, dim],
      );
      // (XᵀX) Qᵀ, as rows: Q Xᵀ X.
      return tf.matMul(tf.matMul(qt, x, false, true), x).arraySync() as number[][];
    });
    q = orthonormal(next.map((r) => Float64Array.from(r)));
  }
  x.dispose();
  return q;
}

function orthonormal(vs: Vec[]): Vec[] {
  const out: Vec[] = [];
  for (const v of vs) {
    const w = Float64Array.from(v);
    for (const u of out) {
      const d = u.reduce((a, x, i) => a + x * (w[i] as number), 0);
      for (let i = 0; i < w.length; i++) w[i] = (w[i] as number) - d * (u[i] as number);
    }
    const n = Math.sqrt(w.reduce((a, x) => a + x * x, 0)) || 1;
    out.push(w.map((x) => x / n));
  }
  return out;
}

/** Gauss–Jordan inverse of a small symmetric positive-definite matrix. */
function invert(m: Vec[]): Vec[] {
  const n = m.length;
  const a: Vec[] = m.map((row, i) => Float64Array.from([...row, ...Array.from({ length: n }, (_, j) => (i === j ? 1 : 0))]));
  for (let c = 0; c < n; c++) {
    let pivot = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(a[r]?.[c] as number) > Math.abs(a[pivot]?.[c] as number)) pivot = r;
    [a[c], a[pivot]] = [a[pivot] as Vec, a[c] as Vec];
    const row = a[c] as Vec;
    const p = row[c] as number;
    for (let j = 0; j < 2 * n; j++) row[j] = (row[j] as number) / p;
    for (let r = 0; r < n; r++) {
      if (r === c) continue;
      const other = a[r] as Vec;
      const f = other[c] as number;
      if (f !== 0) for (let j = 0; j < 2 * n; j++) other[j] = (other[j] as number) - f * (row[j] as number);
    }
  }
  return a.map((row) => row.slice(n));
}

/** Share of `ood` scoring above the threshold that rejects `rejectShare` of `id` (fit on the in-distribution scores). */
export function rejectedAt(id: readonly number[], ood: readonly number[], rejectShare = 0.05): number {
  const sorted = [...id].sort((a, b) => a - b);
  const threshold = sorted[Math.min(sorted.length - 1, Math.floor((1 - rejectShare) * sorted.length))] as number;
  return ood.filter((s) => s > threshold).length / Math.max(1, ood.length);
}
