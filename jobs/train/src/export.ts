import * as tf from "@tensorflow/tfjs";
import { applyBetween } from "./graph.ts";
import { applyLayers, LAYER_NAMES } from "./head.ts";
import { loadModel, type ModelFiles, modelToFiles, WEIGHTS_FILE } from "./model-io.ts";
import type { WeightDtype } from "./weights.ts";

/**
 * The deployable classifier: image (size×size×3, preprocessed) → base up to the feature layer →
 * global average pooling → head → softmax. One flat functional model that stock
 * `tf.loadLayersModel` reads; layers are shared with the trained objects, so fine-tuned base
 * weights are what gets exported.
 */
export function buildClassifier(base: tf.LayersModel, featureLayer: string, size: number, head: tf.layers.Layer[]): tf.LayersModel {
  const input = tf.input({ shape: [size, size, 3], name: "image" });
  const features = applyBetween(base, input, featureLayer);
  const pooled = tf.layers.globalAveragePooling2d({ name: LAYER_NAMES.pool }).apply(features) as tf.SymbolicTensor;
  return tf.model({ inputs: input, outputs: applyLayers(head, pooled), name: "edgetune_classifier" });
}

/**
 * Serialises the classifier in `dtype`, reloads the bytes with stock tfjs and checks that predictions
 * on `probe` inputs stay within `tolerance` of the in-memory model, so a broken or lossy export is
 * never written. Returns the files and the largest probability change seen.
 */
export async function exportClassifier(
  model: tf.LayersModel,
  dtype: WeightDtype,
  probe: tf.Tensor4D,
  tolerance: number,
): Promise<{ files: ModelFiles; maxDelta: number; argmaxChanged: number }> {
  const files = await modelToFiles(model, dtype);
  const reloaded = await loadModel(files.modelJson, new Map([[WEIGHTS_FILE, files.weights]]));
  try {
    const [a, b] = tf.tidy(() => [model.predict(probe) as tf.Tensor2D, reloaded.predict(probe) as tf.Tensor2D]);
    const pa = (await a?.array()) as number[][];
    const pb = (await b?.array()) as number[][];
    a?.dispose();
    b?.dispose();
    let maxDelta = 0;
    let argmaxChanged = 0;
    pa.forEach((row, i) => {
      const other = pb[i] as number[];
      row.forEach((v, j) => {
        maxDelta = Math.max(maxDelta, Math.abs(v - (other[j] as number)));
      });
      if (row.indexOf(Math.max(...row)) !== other.indexOf(Math.max(...other))) argmaxChanged++;
    });
    if (maxDelta > tolerance) throw new Error(`exported ${dtype} model drifts from the trained one by ${maxDelta.toFixed(4)} (> ${tolerance})`);
    return { files, maxDelta, argmaxChanged };
  } finally {
    reloaded.dispose();
  }
}
