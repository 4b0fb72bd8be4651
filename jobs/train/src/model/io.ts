import * as tf from "@tensorflow/tfjs";
import { POOL_LAYER } from "#shared/novelty.ts";
import { foldBatchNorm } from "./fold.ts";
import { encodeWeights, type SavedModel, saveToMemory, type WeightDtype } from "./weights.ts";

/**
 * tfjs LayersModel files (`model.json` + one weight shard) in memory, and back. Edgetune writes a
 * single shard per model: S3 and the edge fetch one object faster than many small ones.
 */
export const WEIGHTS_FILE = "group1-shard1of1.bin";

export interface ModelFiles {
  modelJson: Uint8Array;
  weights: Uint8Array;
}

interface ModelJson {
  modelTopology: { model_config?: { config: KerasConfig }; config?: KerasConfig } & Record<string, unknown>;
  weightsManifest: { paths: string[]; weights: tf.io.WeightsManifestEntry[] }[];
  format?: string;
  generatedBy?: string;
  convertedBy?: string | null;
}
interface KerasConfig {
  layers: { class_name: string; config: Record<string, unknown> }[];
}

/** `shard`: the weight file's name (a split version holds a head's shard beside the whole model's). */
export async function modelToFiles(
  model: tf.LayersModel,
  dtype: WeightDtype,
  keepFloat32?: (weight: string) => boolean,
  shard = WEIGHTS_FILE,
): Promise<ModelFiles> {
  return savedToFiles(await saveToMemory(model), dtype, keepFloat32, shard);
}

export function savedToFiles(saved: SavedModel, dtype: WeightDtype, keepFloat32?: (weight: string) => boolean, shard = WEIGHTS_FILE): ModelFiles {
  const { specs, data } = encodeWeights(saved.weightSpecs, saved.weightData, dtype, keepFloat32);
  const json: ModelJson = {
    format: saved.format ?? "layers-model",
    generatedBy: saved.generatedBy,
    convertedBy: "edgetune",
    modelTopology: saved.modelTopology as ModelJson["modelTopology"],
    weightsManifest: [{ paths: [shard], weights: specs }],
  };
  return { modelJson: new TextEncoder().encode(JSON.stringify(json)), weights: new Uint8Array(data) };
}

/**
 * A view of an exported classifier that gives its pooled features (the `edgetune_pool` layer, what the
 * novelty rule reads) beside its scores, in one pass; it shares the model's weights (dispose the model only).
 */
export function withPooledFeatures(model: tf.LayersModel): tf.LayersModel {
  return tf.model({ inputs: model.inputs, outputs: [model.getLayer(POOL_LAYER).output as tf.SymbolicTensor, model.outputs[0] as tf.SymbolicTensor] });
}

/**
 * Loads model files, optionally fixing the input to `size`×`size` (convolutional bases run at any
 * size; the weights do not depend on it). Weight shards are looked up by path in `shards`.
 */
export async function loadModel(
  modelJsonBytes: Uint8Array,
  shards: Map<string, Uint8Array>,
  size?: number,
  options: { foldBatchNorm?: boolean } = {},
): Promise<tf.LayersModel> {
  const json = JSON.parse(new TextDecoder().decode(modelJsonBytes)) as ModelJson;
  if (size !== undefined) setInputSize(json, size);
  const specs: tf.io.WeightsManifestEntry[] = [];
  const buffers: ArrayBuffer[] = [];
  for (const group of json.weightsManifest) {
    specs.push(...group.weights);
    for (const path of group.paths) {
      const bytes = shards.get(path);
      if (!bytes) throw new Error(`weight shard ${path} is missing`);
      buffers.push(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer);
    }
  }
  const weightData = tf.io.CompositeArrayBuffer.join(buffers);
  if (!options.foldBatchNorm) return tf.loadLayersModel(tf.io.fromMemory({ modelTopology: json.modelTopology, weightSpecs: specs, weightData }));
  const config = (json.modelTopology.model_config?.config ?? json.modelTopology.config) as unknown as Parameters<typeof foldBatchNorm>[0];
  const decoded = tf.io.decodeWeights(weightData, specs);
  const folded = foldBatchNorm(config, decoded);
  config.layers = folded.layers;
  const encoded = await tf.io.encodeWeights(folded.weights);
  for (const t of new Set([...Object.values(decoded), ...Object.values(folded.weights)])) t.dispose();
  return tf.loadLayersModel(tf.io.fromMemory({ modelTopology: json.modelTopology, weightSpecs: encoded.specs, weightData: encoded.data }));
}

function setInputSize(json: ModelJson, size: number): void {
  const config = json.modelTopology.model_config?.config ?? json.modelTopology.config;
  const inputs = config?.layers.filter((l) => l.class_name === "InputLayer") ?? [];
  if (inputs.length !== 1) throw new Error(`expected one InputLayer, found ${inputs.length}`);
  const c = (inputs[0] as { config: Record<string, unknown> }).config;
  const key = "batch_input_shape" in c ? "batch_input_shape" : "batch_shape";
  c[key] = [null, size, size, 3];
}
