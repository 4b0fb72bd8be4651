import * as tf from "@tensorflow/tfjs";
import { LAYER_NAMES } from "./head.ts";
import type { RowSource } from "./rows.ts";

/**
 * The head trains on standardised features (each feature minus its mean over the training rows,
 * divided by its standard deviation): features pooled from several layers differ in scale by orders
 * of magnitude, and a softmax with one L2 penalty then underuses the small ones. Measured on the
 * reference datasets (bench/RESULTS.md). Afterwards the scaling is folded into the head's first dense
 * layer, so the exported classifier takes raw pooled features and nothing else changes: the edge,
 * fine-tuning and the served-head comparisons see an ordinary head.
 */
export interface Standardizer {
  mean: Float32Array;
  std: Float32Array;
}

/** Mean and standard deviation per feature over every training row (one pass, in float64). */
export async function standardizerOf(rows: RowSource): Promise<Standardizer> {
  const dim = rows.shape.reduce((a, b) => a * b, 1);
  const sum = new Float64Array(dim);
  const squares = new Float64Array(dim);
  let n = 0;
  for await (const { ids, values } of rows.batches(1024, null)) {
    for (let r = 0; r < ids.length; r++) {
      const base = r * dim;
      for (let i = 0; i < dim; i++) {
        const v = values[base + i] as number;
        sum[i] = (sum[i] as number) + v;
        squares[i] = (squares[i] as number) + v * v;
      }
    }
    n += ids.length;
  }
  const mean = new Float32Array(dim);
  const variance = new Float64Array(dim);
  for (let i = 0; i < dim; i++) {
    const m = (sum[i] as number) / Math.max(1, n);
    mean[i] = m;
    variance[i] = Math.max(0, (squares[i] as number) / Math.max(1, n) - m * m);
  }
  // Small features are the point (they are what the scaling brings up), but a feature that barely
  // varies around a large value must not be magnified: the edge computes it from float16 weights, and
  // its small relative error would grow with 1/σ. So σ is at least a tenth of the feature's RMS
  // (relative errors grow at most 10×; measured to cost nothing on the reference datasets), and 1
  // for a feature constant in training.
  const std = Float32Array.from(variance, (v, i) => (v < 1e-12 ? 1 : Math.max(Math.sqrt(v + 1e-8), 0.1 * Math.sqrt(v + (mean[i] as number) ** 2))));
  return { mean, std };
}

/** No scaling at all (mean 0, deviation 1): folding it changes nothing. */
export function identityStandardizer(dim: number): Standardizer {
  return { mean: new Float32Array(dim), std: new Float32Array(dim).fill(1) };
}

/** The same rows, standardised batch by batch (nothing copied up front: pooled rows can be gigabytes). */
export function standardizedRows(rows: RowSource, s: Standardizer): RowSource {
  const dim = s.mean.length;
  return {
    shape: rows.shape,
    y: rows.y,
    ...(rows.ids ? { ids: rows.ids } : {}),
    async *batches(batchSize, rand) {
      for await (const batch of rows.batches(batchSize, rand)) {
        // Each batch is a fresh array (rows.ts concatenates), so it is scaled in place.
        const v = batch.values;
        for (let r = 0; r < v.length; r += dim) for (let i = 0; i < dim; i++) v[r + i] = ((v[r + i] as number) - (s.mean[i] as number)) / (s.std[i] as number);
        yield batch;
      }
    },
  };
}

/** The head's first dense layer: where the features enter. */
function firstDense(head: readonly tf.layers.Layer[]): tf.layers.Layer {
  const dense = head.find((l) => l.name === LAYER_NAMES.hidden || l.name === LAYER_NAMES.logits);
  if (!dense) throw new Error("the head has no dense layer");
  return dense;
}

/**
 * Weights trained on standardised features, rewritten for raw ones: W' = W / σ (per input row),
 * b' = b − μ·W'. The layer then computes on x exactly what it computed on (x − μ) / σ, up to float
 * rounding.
 */
export function foldStandardization(head: readonly tf.layers.Layer[], s: Standardizer): void {
  const layer = firstDense(head);
  const [kernel, bias] = layer.getWeights() as [tf.Tensor2D, tf.Tensor1D];
  const folded = tf.tidy(() => {
    const k = kernel.div(tf.tensor2d(s.std, [s.std.length, 1]));
    return [k, bias.sub(tf.matMul(tf.tensor2d(s.mean, [1, s.mean.length]), k).reshape([-1]))];
  });
  layer.setWeights(folded);
  for (const t of folded) t.dispose();
}

/** The inverse of `foldStandardization`, for a served head that a retrain starts from: W = W'·σ, b = b' + μ·W'. */
export function unfoldStandardization(weights: readonly tf.Tensor[], s: Standardizer): tf.Tensor[] {
  const [kernel, bias] = weights as [tf.Tensor2D, tf.Tensor1D];
  return tf.tidy(() => [kernel.mul(tf.tensor2d(s.std, [s.std.length, 1])), bias.add(tf.matMul(tf.tensor2d(s.mean, [1, s.mean.length]), kernel).reshape([-1]))]);
}

/** The name of the layer `foldStandardization` rewrites. */
export function standardizedLayerName(head: readonly tf.layers.Layer[]): string {
  return firstDense(head).name;
}
