import jpegWasm from "@jsquash/jpeg/codec/dec/mozjpeg_dec.wasm";
import decodeJpeg, { init as initJpeg } from "@jsquash/jpeg/decode";
// @ts-expect-error: wrangler's CompiledWasm rule makes the default export a WebAssembly.Module; the package's .d.ts describes wasm-bindgen exports instead
import pngWasm from "@jsquash/png/codec/pkg/squoosh_png_bg.wasm";
import decodePng, { init as initPng } from "@jsquash/png/decode";
import encodePngData from "@jsquash/png/encode";
import webpWasm from "@jsquash/webp/codec/dec/webp_dec.wasm";
import decodeWebp, { init as initWebp } from "@jsquash/webp/decode";
import { imageSize } from "image-size";
import { decode as decodeJpegJs } from "jpeg-js";
import { type ImageFormat, sniffFormat } from "#shared/image/format.ts";
import { decodeGifFirstFrame, type GifFirstFrame, inspectGif } from "#shared/image/gif.ts";
import { inspectJpeg, JpegStructureError, JpegTooManyScansError, MAX_JPEG_SCANS } from "#shared/image/jpeg.ts";
import type { Pixels } from "#shared/preprocess.ts";
import { ApiError } from "../http/errors.ts";
import { instantiateTracked, trackWasmMemory } from "../memory.ts";

/**
 * Image decoding in the worker with @jsquash (mozjpeg, libpng via Rust, libwebp compiled to wasm,
 * precompiled modules as Workers require) and omggif for GIF (first frame, as training reads it). The
 * dimensions are read first, the way the decoder will read them, and an image over `maxPixels` is
 * refused before any pixel is decoded: a 30000×30000 PNG of a few KiB would otherwise ask for 3.6 GB.
 * JPEGs are walked marker by marker as libjpeg does (shared/image/jpeg.ts), which also bounds the scans
 * of a progressive JPEG. JPEG EXIF orientation is applied, as the training side does (sharp).
 */
export const EDGE_FORMATS = { jpeg: "image/jpeg", png: "image/png", webp: "image/webp", gif: "image/gif" } as const;
export type EdgeFormat = keyof typeof EDGE_FORMATS & ImageFormat;

// workerd has no ImageData; the decoders construct one.
(globalThis as { ImageData?: unknown }).ImageData ??= class ImageData {
  data: Uint8ClampedArray;
  width: number;
  height: number;
  constructor(data: Uint8ClampedArray, width: number, height: number) {
    this.data = data;
    this.width = width;
    this.height = height;
  }
};

/** jsquash's typings list only the option overrides; at run time `init` takes the precompiled module first. */
const emscriptenInit = (init: unknown) => init as (module: WebAssembly.Module, overrides: object) => Promise<void>;

let ready: Promise<void> | undefined;
function initDecoders(): Promise<void> {
  ready ??= Promise.all([
    emscriptenInit(initJpeg)(jpegWasm, { instantiateWasm: instantiateTracked("jpeg", jpegWasm) }),
    initPng(pngWasm).then((exports) => trackWasmMemory("png", exports as unknown as WebAssembly.Exports)),
    emscriptenInit(initWebp)(webpWasm, { instantiateWasm: instantiateTracked("webp", webpWasm) }),
  ]).then(() => undefined);
  return ready;
}

/** Real image formats this worker does not decode, so the client hears "unsupported", not "corrupt". */
function knownUnsupported(bytes: Uint8Array): string | null {
  const ascii = (from: number, to: number) => String.fromCharCode(...bytes.subarray(from, to));
  if (ascii(0, 2) === "BM") return "BMP";
  if (ascii(0, 4) === "II*\0" || ascii(0, 4) === "MM\0*") return "TIFF";
  if (ascii(4, 8) === "ftyp") {
    const brand = ascii(8, 12);
    if (brand.startsWith("avi")) return "AVIF";
    if (brand.startsWith("hei") || brand.startsWith("hev") || brand === "mif1" || brand === "msf1") return "HEIC";
  }
  return null;
}

export interface Decoded {
  pixels: Pixels;
  format: EdgeFormat;
}

/** RGBA pixels as a PNG file, with the same libpng module the decoder uses (captured copies). */
export async function encodePng(pixels: Pixels): Promise<Uint8Array> {
  if (pixels.channels !== 4) throw new TypeError("encodePng takes RGBA pixels");
  await initDecoders();
  const data = new Uint8ClampedArray(pixels.data.buffer, pixels.data.byteOffset, pixels.data.byteLength);
  const image = { data, width: pixels.width, height: pixels.height, colorSpace: "srgb" } as const;
  return new Uint8Array(await encodePngData(image as Parameters<typeof encodePngData>[0]));
}

export async function decodeImage(bytes: Uint8Array, maxPixels: number): Promise<Decoded> {
  if (bytes.byteLength === 0) throw new ApiError(400, "empty_image", "The request body is empty; send the image bytes.");
  const format = sniffFormat(bytes);
  if (!format) {
    const other = knownUnsupported(bytes);
    if (other) throw new ApiError(415, "unsupported_media_type", `${other} is not supported; send JPEG, PNG, WebP or GIF.`);
    throw new ApiError(400, "corrupt_image", "The body is not a JPEG, PNG, WebP or GIF image.");
  }
  const declared = declaredSize(bytes, format);
  const { width, height } = declared;
  if (width <= 0 || height <= 0) throw new ApiError(400, "corrupt_image", `The ${format.toUpperCase()} header has no valid size.`);
  if (width * height > maxPixels) {
    throw new ApiError(
      413,
      "image_too_large",
      `The image is ${width}×${height} (${((width * height) / 1e6).toFixed(1)} MP); the limit is ${(maxPixels / 1e6).toFixed(1)} MP.`,
    );
  }
  if (format === "gif") {
    try {
      return { pixels: decodeGifFirstFrame(declared as GifFirstFrame, maxPixels), format };
    } catch {
      throw new ApiError(400, "corrupt_image", "The GIF data is corrupt or truncated.");
    }
  }
  await initDecoders();
  let image: { data: Uint8ClampedArray; width: number; height: number };
  try {
    // The body's own buffer when the bytes are all of it (they are, from the request): no second copy.
    const whole = bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength;
    const buffer = (whole ? bytes.buffer : bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)) as ArrayBuffer;
    image = format === "jpeg" ? await decodeJpeg(buffer, { preserveOrientation: true }) : format === "png" ? await decodePng(buffer) : await decodeWebp(buffer);
  } catch {
    // mozjpeg's RGBA output cannot take CMYK/YCCK JPEGs (print workflows, some scanners); the pure-JS
    // decoder converts them (without a colour profile, as sharp does with ignoreIcc on the training side).
    const cmyk = format === "jpeg" ? decodeCmykJpeg(bytes, maxPixels) : null;
    if (!cmyk) throw new ApiError(400, "corrupt_image", `The ${format.toUpperCase()} data is corrupt or truncated.`);
    image = cmyk;
  }
  // EXIF orientation may swap the sides; anything else means the decoder read another frame than the check.
  const sameSize = (image?.width === width && image.height === height) || (image?.width === height && image.height === width);
  if (!image || !sameSize || image.width * image.height * 4 !== image.data.length)
    throw new ApiError(400, "corrupt_image", `The ${format.toUpperCase()} data could not be decoded.`);
  return { pixels: { data: image.data, width: image.width, height: image.height, channels: 4 }, format };
}

/** The size the decoder will allocate for, read the way the decoder reads it. */
function declaredSize(bytes: Uint8Array, format: EdgeFormat): { width: number; height: number } | GifFirstFrame {
  try {
    if (format === "jpeg") return inspectJpeg(bytes);
    if (format === "gif") return inspectGif(bytes);
    const { width = 0, height = 0 } = imageSize(bytes);
    return { width, height };
  } catch (e) {
    if (e instanceof JpegTooManyScansError)
      throw new ApiError(422, "image_too_complex", `The JPEG has more than ${MAX_JPEG_SCANS} scans (a normal progressive JPEG has about 10); re-encode it.`);
    throw new ApiError(400, "corrupt_image", `The ${format.toUpperCase()} header cannot be read${e instanceof JpegStructureError ? ` (${e.message})` : ""}.`);
  }
}

function decodeCmykJpeg(bytes: Uint8Array, maxPixels: number): { data: Uint8ClampedArray; width: number; height: number } | null {
  if (inspectJpeg(bytes).components !== 4) return null;
  try {
    const d = decodeJpegJs(bytes, { useTArray: true, formatAsRGBA: true, tolerantDecoding: false, maxResolutionInMP: maxPixels / 1e6, maxMemoryUsageInMB: 96 });
    return { data: new Uint8ClampedArray(d.data.buffer, d.data.byteOffset, d.data.byteLength), width: d.width, height: d.height };
  } catch {
    return null;
  }
}
