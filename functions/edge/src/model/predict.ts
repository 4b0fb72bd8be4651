import * as tfl from "@tensorflow/tfjs-layers";
import type { Prediction } from "#shared/answer.ts";
import { similarity } from "#shared/novelty.ts";
import { tf } from "../tf.ts";
import type { LoadedBase } from "./bases.ts";

/**
 * What a served model runs on one preprocessed image: a whole classifier, or a head on the pooled
 * features of its shared base.
 */
export interface Runnable {
  model: tfl.LayersModel;
  /** Set for a head: its base, and the layers whose pooled outputs it takes, in order. */
  base?: LoadedBase;
  layers?: readonly string[];
  /** Set for a version with a novelty floor: the labels' directions, and for a whole model the view giving [features, scores]. */
  classMeans?: Float32Array;
  probe?: tfl.LayersModel;
}

/**
 * Scores of every model for one image `x` (preprocessed for all of them), and the similarity of its
 * features to the labels' where the version has a novelty floor (shared/novelty.ts). Heads on the same
 * base share one pass of it: the base computes the union of the layers they pool, once, and each head
 * reads the pooled vectors it needs. Features are computed as training's split export checks them
 * (jobs/train/src/model/split.ts): each layer averaged over space, concatenated in the head's order.
 */
export function predictAll(models: readonly Runnable[], x: tf.Tensor4D): Prediction[] {
  const outputs = tf.tidy(() => {
    const pooledByBase = new Map<LoadedBase, Map<string, tf.Tensor2D>>();
    for (const m of models) {
      if (!m.base || pooledByBase.has(m.base)) continue;
      const wanted = [...new Set(models.flatMap((o) => (o.base === m.base ? (o.layers ?? []) : [])))].sort();
      const out = extractor(m.base, wanted).predict(x);
      const maps = Array.isArray(out) ? out : [out];
      pooledByBase.set(m.base, new Map(wanted.map((l, i) => [l, tf.mean(maps[i] as tf.Tensor, [1, 2]) as tf.Tensor2D])));
    }
    return models.map((m): { scores: tf.Tensor; features?: tf.Tensor } => {
      if (!m.base) {
        if (!m.probe) return { scores: m.model.predict(x) as tf.Tensor };
        const [features, scores] = m.probe.predict(x) as tf.Tensor[];
        return { scores: scores as tf.Tensor, features: features as tf.Tensor };
      }
      const pooled = pooledByBase.get(m.base) as Map<string, tf.Tensor2D>;
      const parts = (m.layers ?? []).map((l) => pooled.get(l) as tf.Tensor2D);
      const features = parts.length === 1 ? (parts[0] as tf.Tensor2D) : tf.concat2d(parts, 1);
      return { scores: m.model.predict(features) as tf.Tensor, ...(m.classMeans ? { features } : {}) };
    });
  });
  // The tensors tf.tidy returns are kept alive by design: read them all, then dispose each once (heads
  // pooling one layer of the same base share one features tensor).
  try {
    return outputs.map((o, i) => {
      const scores = o.scores.dataSync() as Float32Array;
      const means = models[i]?.classMeans;
      return { scores, ...(o.features && means ? { similarity: similarity(o.features.dataSync(), means) } : {}) };
    });
  } finally {
    tf.dispose([...new Set(outputs.flatMap((o) => (o.features ? [o.scores, o.features] : [o.scores])))]);
  }
}

const MAX_VIEWS = 32;

/** A view on the base that outputs `layers` (no weights of its own), made once per set of layers. */
function extractor(base: LoadedBase, layers: readonly string[]): tfl.LayersModel {
  const key = layers.join("\n");
  let view = base.extractors.get(key);
  if (!view) {
    // Views are cheap but each set of layers a multi-model request asks for makes one: keep a few.
    if (base.extractors.size >= MAX_VIEWS) base.extractors.clear();
    view = tfl.model({ inputs: base.model.inputs, outputs: layers.map((l) => base.model.getLayer(l).output as tfl.SymbolicTensor) });
    base.extractors.set(key, view);
  }
  return view;
}
