import { type Pixels, type PreprocessingSpec, preprocess } from "#shared/preprocess.ts";

/**
 * The exported model's input for decoded pixels: shared/preprocess.ts up to its rounding to 8 bits
 * (the "0-255" normalisation is the identity on those bytes), so the caller's part of the pipeline is
 * the edge's own code, and the normalisation is left to the graph.
 */
export function modelInput(pixels: Pixels, size: number, spec: PreprocessingSpec): Uint8Array {
  return Uint8Array.from(preprocess(pixels, size, { ...spec, normalization: "0-255" }));
}
