import * as tf from "@tensorflow/tfjs";
import { SPLIT_FILES } from "#shared/contracts/artifact.ts";
import { EdgetuneError } from "#shared/errors.ts";
import { type ExtractorSpec, pooledLayersOf } from "../features/extract.ts";
import { applyLayers, LAYER_NAMES } from "../fit/head.ts";
import { applyBetween } from "./graph.ts";
import { loadModel, type ModelFiles, modelToFiles, WEIGHTS_FILE } from "./io.ts";

/**
 * The split form of a head-strategy classifier (ARCHITECTURE.md "One base, many models"): the base cut
 * at its feature layer, shared by every model of that base and size, and the head alone (pooled
 * features → probabilities, the standardisation already folded into its first dense layer). The edge
 * computes the features of several heads with one pass of the base.
 */
export interface SplitFiles {
  base: ModelFiles;
  head: ModelFiles;
  /** Length of the feature vector the head takes. */
  features: number;
  /** Largest probability change between the whole trained model and head-on-reloaded-base, on the probe images. */
  maxDelta: number;
}

/** The head on its own did not answer as the whole model does: the version is published whole only. */
export class SplitMismatchError extends EdgetuneError {
  constructor(message: string) {
    super("split_mismatch", message);
  }
}

/** The base from its input to `featureLayer`, input fixed to `size`: what every split model of this base and size shares. */
export function sharedBaseModel(base: tf.LayersModel, featureLayer: string, size: number): tf.LayersModel {
  const input = tf.input({ shape: [size, size, 3], name: "image" });
  return tf.model({ inputs: input, outputs: applyBetween(base, input, featureLayer), name: "edgetune_base" });
}

/**
 * Features as the edge computes them from a shared base (functions/edge/src/model/features.ts): each
 * of `layers` averaged over space, concatenated in order. The caller disposes the result.
 */
export function pooledFeaturesOf(base: tf.LayersModel, layers: readonly string[], x: tf.Tensor4D): tf.Tensor2D {
  // A view on the loaded base's layers (no weights of its own): never disposed, the base is.
  const extractor = tf.model({ inputs: base.inputs, outputs: layers.map((l) => base.getLayer(l).output as tf.SymbolicTensor) });
  return tf.tidy(() => {
    const out = extractor.predict(x);
    const maps = Array.isArray(out) ? out : [out];
    const pooled = maps.map((m) => tf.mean(m, [1, 2]) as tf.Tensor2D);
    return pooled.length === 1 ? (pooled[0] as tf.Tensor2D) : tf.concat2d(pooled, 1);
  });
}

/**
 * Writes the split form of `classifier` (built by buildClassifier from `base` and `head`), reloads both
 * parts from their bytes and checks, on real `probe` images, that the head on the reloaded base's
 * features gives the whole classifier's top-1 and its probabilities within `tolerance`.
 */
export async function exportSplit(
  classifier: tf.LayersModel,
  base: tf.LayersModel,
  spec: Pick<ExtractorSpec, "layer" | "pooledLayers">,
  size: number,
  head: tf.layers.Layer[],
  probe: tf.Tensor4D,
  tolerance: number,
): Promise<SplitFiles> {
  const features = (classifier.getLayer(LAYER_NAMES.pool).outputShape as number[])[1] as number;
  const headInput = tf.input({ shape: [features], name: "features" });
  const headModel = tf.model({ inputs: headInput, outputs: applyLayers(head, headInput), name: "edgetune_head" });
  // Base weights were rounded to float16 when it was loaded (bases.ts): float16 stores them exactly.
  const baseFiles = await modelToFiles(sharedBaseModel(base, spec.layer, size), "float16");
  // The head keeps float32, as in the whole model (export.ts).
  const headFiles = await modelToFiles(headModel, "float32", undefined, SPLIT_FILES.headWeights);
  const reBase = await loadModel(baseFiles.modelJson, new Map([[WEIGHTS_FILE, baseFiles.weights]]));
  const reHead = await loadModel(headFiles.modelJson, new Map([[SPLIT_FILES.headWeights, headFiles.weights]]));
  try {
    const [whole, split] = tf.tidy(() => {
      const f = pooledFeaturesOf(reBase, pooledLayersOf(spec), probe);
      return [classifier.predict(probe) as tf.Tensor2D, reHead.predict(f) as tf.Tensor2D];
    });
    const a = (await whole?.array()) as number[][];
    const b = (await split?.array()) as number[][];
    whole?.dispose();
    split?.dispose();
    let maxDelta = 0;
    a.forEach((row, i) => {
      const other = b[i] as number[];
      row.forEach((v, j) => {
        maxDelta = Math.max(maxDelta, Math.abs(v - (other[j] as number)));
      });
      if (row.indexOf(Math.max(...row)) !== other.indexOf(Math.max(...other)))
        throw new SplitMismatchError(`the head on the shared base changes the top-1 answer of probe image ${i + 1}`);
    });
    if (maxDelta > tolerance)
      throw new SplitMismatchError(`the head on the shared base drifts from the whole model by ${maxDelta.toFixed(4)} (> ${tolerance})`);
    return { base: baseFiles, head: headFiles, features, maxDelta };
  } finally {
    reBase.dispose();
    reHead.dispose();
  }
}
