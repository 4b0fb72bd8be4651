import type * as tf from "@tensorflow/tfjs";
import type { ArtifactMetadata } from "#shared/contracts/artifact.ts";
import { POOL_LAYER } from "#shared/novelty.ts";
import { NORMALIZATIONS } from "#shared/preprocess.ts";
import { OPSET, toOnnx } from "../model/onnx.ts";

/** Graph input and output of an exported classifier (what the README's snippets feed and read). */
export const ONNX_INPUT = "image";
export const ONNX_OUTPUT = "probabilities";
/** The second output of a version with a novelty floor: below the floor (metadata_props "novelty"), none of these. */
export const ONNX_SIMILARITY = "similarity";

/**
 * What the caller does before the model, in words (also in the file's metadata): the graph starts at
 * the 8-bit pixels that shared/preprocess.ts rounds to, because its antialiased resampling has no exact
 * ONNX equivalent (measured: bench/export-resize.ts).
 */
export function callerSteps(metadata: ArtifactMetadata): string {
  const s = metadata.input.size;
  const bg = metadata.preprocessing.background ?? [255, 255, 255];
  return [
    metadata.preprocessing.version >= 2 ? `composite transparency onto RGB (${bg.join(", ")})` : "drop the alpha channel",
    metadata.preprocessing.fit === "center-crop" ? "crop the centred square" : "keep the whole frame (stretched)",
    `resize to ${s}x${s} with an antialiased bilinear (triangle) filter, as Pillow's Image.resize(BILINEAR) does`,
    "round to 8 bits",
    `feed uint8 NHWC [N, ${s}, ${s}, 3], RGB order`,
  ].join("; ");
}

/**
 * The served classifier as one ONNX file: uint8 RGB pixels → the base's normalisation → base → pooled
 * layers → head → softmax, with labels and preprocessing in its metadata_props; for a version with a
 * novelty floor, a second output, the features' similarity to the labels (shared/novelty.ts), and the floor. `model` is the version's
 * tfjs model as the edge loads it (float16 weights widened to float32), so its numbers are the edge's.
 */
export function classifierToOnnx(model: tf.LayersModel, metadata: ArtifactMetadata, classMeans?: Float32Array): Uint8Array {
  const normalization = NORMALIZATIONS[metadata.preprocessing.normalization];
  const size = metadata.input.size;
  const novelty = metadata.novelty && classMeans ? metadata.novelty : undefined;
  return toOnnx(model, {
    size,
    pooled: true,
    uint8: normalization,
    names: { input: ONNX_INPUT, output: ONNX_OUTPUT },
    ...(novelty && classMeans ? { similarity: { layer: POOL_LAYER, means: classMeans, output: ONNX_SIMILARITY } } : {}),
    docString: `edgetune model ${metadata.name} ${metadata.version}: ${metadata.labels.length} labels. Before the model: ${callerSteps(metadata)}.`,
    metadata: {
      "edgetune.model": metadata.name,
      "edgetune.version": metadata.version,
      labels: JSON.stringify(metadata.labels),
      input: JSON.stringify({ name: ONNX_INPUT, dtype: "uint8", layout: "NHWC", shape: ["N", size, size, 3], channels: "RGB" }),
      output: JSON.stringify({ name: ONNX_OUTPUT, dtype: "float32", shape: ["N", metadata.labels.length], meaning: "softmax probabilities, labels order" }),
      preprocessing: JSON.stringify({ ...metadata.preprocessing, scale: normalization.scale, offset: normalization.offset }),
      "preprocessing.caller": callerSteps(metadata),
      "preprocessing.in_graph": `x * ${normalization.scale} + ${normalization.offset} (${metadata.preprocessing.normalization}) on the uint8 pixels`,
      ...(novelty
        ? {
            novelty: JSON.stringify({
              output: ONNX_SIMILARITY,
              floor: novelty.floor,
              meaning: "cosine of the image's pooled features to the nearest label's training images; below floor: none of these",
            }),
          }
        : {}),
      base: metadata.base.id,
      opset: String(OPSET),
    },
  });
}
