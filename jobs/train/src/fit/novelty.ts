import * as tf from "@tensorflow/tfjs";
import { ClassMeans, similarity } from "#shared/novelty.ts";
import type { RowSource } from "./rows.ts";

/**
 * The labels' mean directions in the served model's pooled features (shared/novelty.ts) and every
 * held-out image's similarity to them, from the rows the fit already has: the pooled features of the
 * training images (view 0, as served) for a head, or — after fine-tuning, whose top blocks changed the
 * features — the cached bottom maps run through the tuned top up to its pooling. Streamed a batch at a
 * time: nothing is held but the C × D sums and one number per held-out image.
 */
export interface NoveltyFit {
  /** Unit directions, one row of `features` per class in `classes`. */
  means: Float32Array;
  classes: readonly number[];
  features: number;
  /** Training rows each direction was made from, in `classes` order. */
  support: readonly number[];
  /** Per held-out row, in the held-out source's row order. */
  valSimilarity: Float32Array;
}

const BATCH = 256;

/** Feature vectors of a source's rows, a batch at a time: the rows themselves, or `toFeatures` applied to them. */
async function* featureBatches(
  source: RowSource,
  toFeatures: tf.LayersModel | undefined,
): AsyncGenerator<{ ids: Int32Array; values: Float32Array; dim: number }> {
  for await (const { ids, values } of source.batches(BATCH, null)) {
    if (!toFeatures) {
      yield { ids, values, dim: values.length / Math.max(1, ids.length) };
      continue;
    }
    const out = tf.tidy(() => toFeatures.predict(tf.tensor(values, [ids.length, ...source.shape])) as tf.Tensor2D);
    const data = (await out.data()) as Float32Array;
    const dim = out.shape[1];
    out.dispose();
    yield { ids, values: data, dim };
  }
}

export async function fitNovelty(train: RowSource, heldOut: RowSource, classes: readonly number[], toFeatures?: tf.LayersModel): Promise<NoveltyFit> {
  let acc: ClassMeans | undefined;
  for await (const { ids, values, dim } of featureBatches(train, toFeatures)) {
    acc ??= new ClassMeans(classes, dim);
    for (const [i, row] of ids.entries()) acc.add(values.subarray(i * dim, (i + 1) * dim), train.y[row] as number);
  }
  if (!acc) throw new Error("no training rows to fit the labels' mean directions on");
  const means = acc.means();
  const valSimilarity = new Float32Array(heldOut.y.length);
  for await (const { ids, values, dim } of featureBatches(heldOut, toFeatures))
    ids.forEach((row, i) => {
      valSimilarity[row] = similarity(values.subarray(i * dim, (i + 1) * dim), means);
    });
  return { means, classes, features: acc.dim, support: acc.support, valSimilarity };
}
