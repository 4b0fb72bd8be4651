import * as tf from "@tensorflow/tfjs";
import type { InferenceSession, Tensor } from "onnxruntime-node";
import type { ArtifactMetadata } from "#shared/contracts/artifact.ts";
import { type Pixels, preprocess } from "#shared/preprocess.ts";
import { ONNX_INPUT, ONNX_OUTPUT } from "./onnx.ts";

/** Probabilities of one uint8 NHWC image ([size, size, 3] bytes) from an exported model. */
export type ExportedClassifier = (pixels: Uint8Array) => Promise<Float32Array>;

/** An exported classifier run by an ONNX Runtime session: onnxruntime-node's, or onnxruntime-web's (the same API, from onnxruntime-common). */
export function ortClassifier(ort: { Tensor: typeof Tensor }, session: InferenceSession, size: number): ExportedClassifier {
  return async (pixels) => {
    const out = await session.run({ [ONNX_INPUT]: new ort.Tensor("uint8", pixels, [1, size, size, 3]) });
    return (out[ONNX_OUTPUT] as { data: Float32Array }).data;
  };
}

export interface ParityImage {
  name: string;
  pixels: Pixels;
}

export interface Parity {
  images: number;
  /** Images whose top-1 label differs between the export and the edge's computation. */
  top1Differs: string[];
  /** Largest probability difference over every image and label. */
  maxDelta: number;
  ok: boolean;
}

/**
 * The export against what the edge computes for the same decoded image — shared/preprocess.ts, then the
 * version's tfjs model — image by image: the same top-1 and every probability within `tolerance`.
 * `input` prepares the export's uint8 input (export/input.ts's modelInput; a test swaps in a drifted one).
 */
export async function checkParity(
  exported: ExportedClassifier,
  reference: tf.LayersModel,
  metadata: ArtifactMetadata,
  images: readonly ParityImage[],
  input: (pixels: Pixels) => Uint8Array,
  tolerance = 1e-3,
): Promise<Parity> {
  const size = metadata.input.size;
  const top1Differs: string[] = [];
  let maxDelta = 0;
  for (const image of images) {
    const x = preprocess(image.pixels, size, metadata.preprocessing);
    const expected = tf.tidy(() => (reference.predict(tf.tensor4d(x, [1, size, size, 3])) as tf.Tensor).dataSync() as Float32Array);
    const got = await exported(input(image.pixels));
    if (got.length !== expected.length) throw new Error(`the export gives ${got.length} probabilities, the model ${expected.length}`);
    for (let i = 0; i < got.length; i++) maxDelta = Math.max(maxDelta, Math.abs((got[i] as number) - (expected[i] as number)));
    if (argmax(got) !== argmax(expected)) top1Differs.push(image.name);
  }
  return { images: images.length, top1Differs, maxDelta, ok: top1Differs.length === 0 && maxDelta <= tolerance };
}

const argmax = (v: Float32Array) => v.indexOf(Math.max(...v));
