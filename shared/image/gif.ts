import { GifReader } from "omggif";
import type { Pixels } from "../preprocess.ts";

/**
 * The first frame of a GIF as RGBA on its logical screen, the way training reads it (sharp/libvips,
 * `pages: 1`): pixels the frame does not cover, and transparent ones, stay 0,0,0,0. Pure JS (omggif),
 * so the edge, which has no GIF decoder in wasm, sees the same pixels as training.
 *
 * The size checked is the larger of the screen and the first frame: omggif allocates and walks the
 * frame's own rectangle, which a crafted file can make far larger than its screen. A frame that does not
 * fit its screen is refused (libvips clips it, omggif would wrap its rows: the two would disagree).
 */
export class GifStructureError extends Error {}

export interface GifFirstFrame {
  /** The pixels decoding will allocate and walk: the screen or the frame, whichever is larger. */
  width: number;
  height: number;
  reader: GifReader;
}

export function inspectGif(bytes: Uint8Array): GifFirstFrame {
  const reader = new GifReader(bytes);
  if (reader.numFrames() < 1) throw new GifStructureError("the GIF has no frame");
  const frame = reader.frameInfo(0);
  if (frame.x + frame.width > reader.width || frame.y + frame.height > reader.height)
    throw new GifStructureError(
      `the first frame (${frame.width}×${frame.height} at ${frame.x},${frame.y}) does not fit the ${reader.width}×${reader.height} screen`,
    );
  return { width: reader.width, height: reader.height, reader };
}

export function decodeGifFirstFrame(gif: GifFirstFrame, maxPixels: number): Pixels {
  if (gif.width * gif.height > maxPixels) throw new RangeError(`GIF is ${gif.width}×${gif.height}`);
  const data = new Uint8ClampedArray(gif.width * gif.height * 4);
  gif.reader.decodeAndBlitFrameRGBA(0, data);
  return { data, width: gif.width, height: gif.height, channels: 4 };
}
