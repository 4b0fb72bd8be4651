import sharp from "sharp";
import { EdgetuneError } from "#shared/errors.ts";
import { sniffFormat } from "#shared/image/format.ts";
import { inspectGif } from "#shared/image/gif.ts";
import { inspectJpeg, JpegStructureError, JpegTooManyScansError } from "#shared/image/jpeg.ts";
import type { Pixels } from "#shared/preprocess.ts";

/**
 * Image decoding for training: JPEG, PNG, WebP and the first frame of GIF, with EXIF orientation
 * applied, CMYK/greyscale/16-bit converted to 8-bit RGB, embedded ICC profiles ignored, alpha kept. The result goes through the
 * shared `preprocess`, exactly as on the edge (which decodes with @jsquash; the skew is tested).
 */
// libvips' operation cache keeps results to reuse on identical calls; every decode here is of another
// image, so it only holds memory (and measured ~5 % more CPU per decode, 2026-11-29).
sharp.cache(false);

export const MAX_IMAGE_PIXELS = 50_000_000; // a 7000×7000 photo; larger is refused before decoding
export const MAX_IMAGE_BYTES = 50 * 1024 * 1024;

export class ImageDecodeError extends EdgetuneError {
  constructor(reason: string) {
    super("image_undecodable", reason);
  }
}

export async function decodeImage(bytes: Uint8Array): Promise<Pixels> {
  if (bytes.byteLength === 0) throw new ImageDecodeError("empty file");
  if (bytes.byteLength > MAX_IMAGE_BYTES) throw new ImageDecodeError(`file is larger than ${MAX_IMAGE_BYTES / 1024 / 1024} MiB`);
  const format = sniffFormat(bytes);
  if (!format) {
    // Rare: only here is the header read apart, to name what was sent.
    const named = await sharp(bytes, { limitInputPixels: false })
      .metadata()
      .then(
        (m) => m.format,
        () => undefined,
      );
    throw new ImageDecodeError(named ? `unsupported format ${named} (expected JPEG, PNG, WebP or GIF)` : "not a readable image");
  }
  // The same structural check as the edge (first SOF as libjpeg reads it, bounded scans), so an image
  // the worker refuses is not trained on either.
  if (format === "jpeg") {
    try {
      inspectJpeg(bytes);
    } catch (e) {
      if (e instanceof JpegTooManyScansError) throw new ImageDecodeError(`JPEG refused: ${e.message} (a normal progressive JPEG has about 10)`);
      if (e instanceof JpegStructureError) throw new ImageDecodeError(`corrupt jpeg (${e.message})`);
      throw e;
    }
  }
  if (format === "gif") {
    try {
      inspectGif(bytes); // the edge's check: a first frame that does not fit its screen is refused on both sides
    } catch (e) {
      throw new ImageDecodeError(`corrupt gif (${e instanceof Error ? e.message : e})`);
    }
  }
  try {
    // One call into sharp per image (no separate metadata read: on the feature pipeline's hot path,
    // each call costs the main thread ~0.2–0.4 ms). The pixel limit is sharp's own, checked on the
    // header before decoding.
    // ignoreIcc: the edge decoder (@jsquash) does no colour management, so neither may training:
    // otherwise a photo with a wide-gamut profile is seen with different colours by the two sides.
    // Alpha is kept where the image has it (4 channels, else 3): the shared preprocess composites it
    // (version 2) or ignores it (version 1), exactly as the edge does with its decoders' RGBA.
    const { data, info } = await sharp(bytes, { failOn: "error", limitInputPixels: MAX_IMAGE_PIXELS, pages: 1, ignoreIcc: true })
      .rotate()
      .toColourspace("srgb")
      .raw({ depth: "uchar" })
      .toBuffer({ resolveWithObject: true });
    if (info.channels !== 3 && info.channels !== 4) throw new ImageDecodeError(`unexpected ${info.channels} channels after conversion`);
    return { data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength), width: info.width, height: info.height, channels: info.channels };
  } catch (e) {
    if (e instanceof ImageDecodeError) throw e;
    const message = e instanceof Error ? e.message.split("\n")[0] : String(e);
    if (/pixel limit/i.test(message ?? "")) {
      const meta = await sharp(bytes, { limitInputPixels: false })
        .metadata()
        .catch(() => ({ width: "?", height: "?" }));
      throw new ImageDecodeError(`image is ${meta.width}×${meta.height}, more than ${MAX_IMAGE_PIXELS / 1e6} megapixels`);
    }
    throw new ImageDecodeError(`corrupt ${format} (${message})`);
  }
}
