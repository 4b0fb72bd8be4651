import * as tf from "@tensorflow/tfjs";
import { concatBytes } from "#shared/bytes.ts";

/**
 * Weight (de)serialisation: tfjs writes only float32 weights; edgetune exports float16 (half the
 * bytes, predictions unchanged within 0.005, see ARCHITECTURE.md) or affine uint8 per tensor. Readers
 * need nothing special: tfjs-core's `decodeWeights` understands both `quantization` entries.
 * Written here because tfjs has no writer (only the Python converter quantizes); tested against
 * tfjs's own decoder in weights.test.ts.
 */
export type WeightDtype = "float32" | "float16" | "uint8";

export interface SavedModel {
  /** model.json without `weightsManifest`. */
  modelTopology: object;
  format?: string;
  generatedBy?: string;
  convertedBy?: string | null;
  weightSpecs: tf.io.WeightsManifestEntry[];
  weightData: ArrayBuffer;
}

/** Captures a LayersModel's artifacts in memory (float32). */
export async function saveToMemory(model: tf.LayersModel): Promise<SavedModel> {
  let saved: SavedModel | undefined;
  await model.save(
    tf.io.withSaveHandler(async (artifacts) => {
      const data = artifacts.weightData;
      saved = {
        modelTopology: artifacts.modelTopology as object,
        format: artifacts.format,
        generatedBy: artifacts.generatedBy,
        convertedBy: artifacts.convertedBy ?? null,
        weightSpecs: artifacts.weightSpecs ?? [],
        weightData: data instanceof ArrayBuffer ? data : tf.io.CompositeArrayBuffer.join(data ?? []),
      };
      return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: "JSON" } };
    }),
  );
  if (!saved) throw new Error("model.save produced no artifacts");
  return saved;
}

/** Rounds every value to the nearest float16 (kept as float32), in place: what a float16 store keeps. */
export function roundToHalf(values: Float32Array): Float32Array {
  for (let i = 0; i < values.length; i++) values[i] = Math.f16round(values[i] as number);
  return values;
}

/** Rounds a model's float32 weights to float16 precision, as its float16 export will store them. */
export function roundWeightsToHalf(model: tf.LayersModel): void {
  for (const layer of model.layers) {
    const weights = layer.getWeights();
    if (weights.length === 0) continue;
    // A copy of each weight's values (a backend may hand out its own array), rounded.
    const rounded = weights.map((w) => (w.dtype === "float32" ? tf.tensor(roundToHalf(Float32Array.from(w.dataSync() as Float32Array)), w.shape) : w.clone()));
    layer.setWeights(rounded);
    for (const t of rounded) t.dispose();
  }
}

/**
 * Re-encodes float32 weights as `dtype`. Non-float32 tensors (int32 etc.) are kept as they are, and so
 * are the weights `keepFloat32` names (the format gives each weight its own encoding).
 */
export function encodeWeights(
  specs: tf.io.WeightsManifestEntry[],
  data: ArrayBuffer,
  dtype: WeightDtype,
  keepFloat32: (name: string) => boolean = () => false,
): { specs: tf.io.WeightsManifestEntry[]; data: ArrayBuffer } {
  const decoded = tf.io.decodeWeights(data, specs);
  const outSpecs: tf.io.WeightsManifestEntry[] = [];
  const chunks: Uint8Array[] = [];
  for (const spec of specs) {
    const t = decoded[spec.name] as tf.Tensor;
    const values = t.dataSync();
    t.dispose();
    const base = { name: spec.name, shape: spec.shape, dtype: spec.dtype };
    if (spec.dtype !== "float32" || dtype === "float32" || keepFloat32(spec.name)) {
      outSpecs.push(base);
      chunks.push(new Uint8Array(values.buffer.slice(values.byteOffset, values.byteOffset + values.byteLength)));
    } else if (dtype === "float16") {
      // IEEE binary16, round to nearest even (Node 24's Float16Array); tfjs reads it as `quantization: float16`.
      const half = Float16Array.from(values as Float32Array);
      outSpecs.push({ ...base, quantization: { dtype: "float16" } });
      chunks.push(new Uint8Array(half.buffer));
    } else {
      let min = Number.POSITIVE_INFINITY;
      let max = Number.NEGATIVE_INFINITY;
      for (const v of values as Float32Array) {
        if (v < min) min = v;
        if (v > max) max = v;
      }
      const scale = max > min ? (max - min) / 255 : 1;
      const q = new Uint8Array(values.length);
      for (let i = 0; i < values.length; i++) q[i] = Math.round(((values[i] as number) - min) / scale);
      outSpecs.push({ ...base, quantization: { dtype: "uint8", min, scale } });
      chunks.push(q);
    }
  }
  return { specs: outSpecs, data: concatBytes(chunks).buffer };
}
