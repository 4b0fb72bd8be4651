import { GifReader } from "omggif";
import type { Pixels } from "../preprocess.ts";

/**
 * The first frame of a GIF as RGBA on its logical screen, the way training reads it (sharp/libvips,
 * `pages: 1`): pixels the frame does not cover, and transparent ones, stay 0,0,0,0. Pure JS (omggif),
 * so the edge, which has no GIF decoder in wasm, sees the same pixels as training.
 */
export function gifSize(bytes: Uint8Array): { width: number; height: number } {
  const reader = new GifReader(bytes);
  return { width: reader.width, height: reader.height };
}

export function decodeGifFirstFrame(bytes: Uint8Array, maxPixels: number): Pixels {
  const reader = new GifReader(bytes);
  if (reader.width * reader.height > maxPixels) throw new RangeError(`GIF is ${reader.width}×${reader.height}`);
  if (reader.numFrames() < 1) throw new RangeError("GIF has no frame");
  const data = new Uint8ClampedArray(reader.width * reader.height * 4);
  reader.decodeAndBlitFrameRGBA(0, data);
  return { data, width: reader.width, height: reader.height, channels: 4 };
}
