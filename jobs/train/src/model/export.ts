import * as tf from "@tensorflow/tfjs";
import { type PreprocessingSpec, preprocess } from "#shared/preprocess.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import { decodeImage } from "../dataset/decode.ts";
import type { DatasetImage } from "../dataset/read.ts";
import { type ExtractorSpec, pooledLayersOf } from "../features/extract.ts";
import type { PooledFeatures } from "../features/pooled.ts";
import { applyLayers, concatRows, LAYER_NAMES } from "../fit/head.ts";
import type { RunPlan } from "../plan.ts";
import type { RunContext } from "../run.ts";
import { applyBetweenAll, poolMaps } from "./graph.ts";
import { loadModel, type ModelFiles, modelToFiles, WEIGHTS_FILE } from "./io.ts";
import { exportSplit, type SplitFiles, SplitMismatchError } from "./split.ts";
import type { WeightDtype } from "./weights.ts";

/**
 * The deployable classifier: image (size×size×3, preprocessed) → base up to the feature layer →
 * global average pooling (of that layer, or of it and the spec's `pooledLayers`, concatenated) → head → softmax. One flat functional model that stock
 * `tf.loadLayersModel` reads; layers are shared with the trained objects, so fine-tuned base
 * weights are what gets exported.
 */
export function buildClassifier(
  base: tf.LayersModel,
  layers: Pick<ExtractorSpec, "layer" | "pooledLayers">,
  size: number,
  head: tf.layers.Layer[],
): tf.LayersModel {
  const input = tf.input({ shape: [size, size, 3], name: "image" });
  const maps = applyBetweenAll(base, input, pooledLayersOf(layers));
  return tf.model({ inputs: input, outputs: applyLayers(head, poolMaps(maps, LAYER_NAMES.pool)), name: "edgetune_classifier" });
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
  // The head's weights stay float32 (a few KB): folding the feature standardisation into them
  // (fit/standardize.ts) widens their range beyond what float16 holds to the 0.02 tolerance.
  const files = await modelToFiles(model, dtype, (weight) => weight.startsWith("edgetune_"));
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

export interface Exported {
  files: ModelFiles;
  dtype: WeightDtype;
  /** Largest probability change between the trained model and the reloaded export on the probe images. */
  maxDelta: number;
  /** Head-strategy versions: the head and the shared base, verified against the whole model (model/split.ts). */
  split?: SplitFiles;
}

/** The float16 tolerance: largest probability change an export may bring. */
const FLOAT16_TOLERANCE = 0.02;

/**
 * Stage 5: the deployable classifier in the requested weight dtype, checked by reloading it on real
 * held-out images. uint8 that changes any prediction falls back to float16 (uint8 of fine-tuned layers
 * flipped predictions in measurements; float16 never did).
 */
export async function exportVersion(
  ctx: RunContext,
  plan: RunPlan,
  baseModel: tf.LayersModel,
  head: tf.layers.Layer[],
  pooled: PooledFeatures,
): Promise<Exported> {
  const size = plan.options.imageSize;
  const classifier = buildClassifier(baseModel, plan.pooledSpec, size, head);
  const probe = await probeInputs(ctx.store, pooled.val.length > 0 ? pooled.val : pooled.train, size, plan.preprocessing);
  try {
    return await ctx.stage(
      "export",
      async () => {
        const dtype = plan.options.weights;
        const attempt = await exportClassifier(classifier, dtype, probe, dtype === "uint8" ? 1 : FLOAT16_TOLERANCE);
        let whole: Exported;
        if (dtype === "uint8" && attempt.argmaxChanged > 0) {
          ctx.log.warn(`uint8 weights changed ${attempt.argmaxChanged} prediction(s) on held-out images; exporting float16 instead`);
          whole = { ...(await exportClassifier(classifier, "float16", probe, FLOAT16_TOLERANCE)), dtype: "float16" as const };
        } else whole = { ...attempt, dtype };
        // Fine-tuned versions changed their base: only head-strategy versions share one (ARCHITECTURE.md).
        if (plan.options.strategy !== "head") return whole;
        try {
          return { ...whole, split: await exportSplit(classifier, baseModel, plan.pooledSpec, size, head, probe, FLOAT16_TOLERANCE) };
        } catch (e) {
          if (!(e instanceof SplitMismatchError)) throw e;
          ctx.log.warn(`${e.message}; publishing the whole model only`);
          return whole;
        }
      },
      (e) => ({
        dtype: e.dtype,
        bytes: e.files.weights.byteLength,
        maxDelta: e.maxDelta,
        ...(e.split ? { headBytes: e.split.head.weights.byteLength, splitMaxDelta: e.split.maxDelta } : {}),
      }),
    );
  } finally {
    probe.dispose();
  }
}

/** A few real preprocessed images to check the export against. */
async function probeInputs(store: ObjectStore, images: readonly DatasetImage[], size: number, spec: PreprocessingSpec): Promise<tf.Tensor4D> {
  const rows: Float32Array[] = [];
  for (const image of images) {
    if (rows.length >= 8) break;
    const bytes = await store.get(image.key);
    if (!bytes) continue;
    try {
      rows.push(preprocess(await decodeImage(bytes), size, spec));
    } catch {
      // skipped images were reported already
    }
  }
  return tf.tensor4d(concatRows(rows), [rows.length, size, size, 3]);
}
