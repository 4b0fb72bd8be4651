import { z } from "zod";

/**
 * The one image preprocessing of edgetune, shared by training (Node) and serving (workerd), so both
 * feed the model the same tensors. A model records the spec it was trained with in its metadata and
 * the edge applies exactly that spec.
 *
 * Version 1: take the decoded RGB(A) pixels as they are (alpha ignored, orientation already applied by
 * the decoder), crop the centred square (or keep the whole frame with `fit: "stretch"`), resample to
 * `size`×`size` with a separable triangle filter whose support widens with the scale factor (bilinear
 * with antialiasing, as Pillow and `tf.image.resize(antialias=True)` do), then normalise per the base.
 * Bump the version when any of this changes: old models keep their version and stay reproducible.
 *
 * Version 2: the same, except that transparency is composited onto a fixed background (white by
 * default) before resampling. Version 1 read whatever RGB sits under transparent pixels, which differs
 * from one tool or source to the next (icons, cut-outs), so the model saw arbitrary colours there.
 * Training and the edge composite here, in the same code, never in a decoder.
 */
export const PREPROCESSING_VERSIONS = [1, 2] as const;
export const LATEST_PREPROCESSING = 2 as const;

export const NORMALIZATIONS = {
  /** x / 127.5 − 1: Keras MobileNetV2 and MobileNet v1 ImageNet weights. */
  "minus1-1": { scale: 1 / 127.5, offset: -1 },
  /** x / 255: what the nsfwjs MobileNetV2 and Darknet expect. */
  "0-1": { scale: 1 / 255, offset: 0 },
  /** raw 0–255 floats. */
  "0-255": { scale: 1, offset: 0 },
} as const;
export type Normalization = keyof typeof NORMALIZATIONS;

const byte = z.number().int().min(0).max(255);

export const preprocessingSchema = z.object({
  version: z.union(PREPROCESSING_VERSIONS.map((v) => z.literal(v)) as [z.ZodLiteral<1>, z.ZodLiteral<2>]),
  fit: z.enum(["center-crop", "stretch"]).default("center-crop"),
  normalization: z.enum(Object.keys(NORMALIZATIONS) as [Normalization, ...Normalization[]]),
  /** Version 2: the RGB that transparent pixels are composited onto. */
  background: z.tuple([byte, byte, byte]).optional(),
});
export type PreprocessingSpec = z.output<typeof preprocessingSchema>;

/** Decoded pixels, row-major, interleaved channels (3 = RGB, 4 = RGBA). */
export interface Pixels {
  data: Uint8Array | Uint8ClampedArray;
  width: number;
  height: number;
  channels: 3 | 4;
}

/** Training-time augmentation hooks: a source rectangle instead of `fit`, and a mirror image. */
export interface PreprocessOptions {
  region?: { x: number; y: number; width: number; height: number };
  flip?: boolean;
  /** Write the result here, at `offset` (a batch being assembled), instead of a new array. */
  into?: { data: Float32Array; offset: number };
}

/** Returns a `size`×`size`×3 float32 tensor body (HWC) ready for the model. */
export function preprocess(pixels: Pixels, size: number, spec: PreprocessingSpec, options: PreprocessOptions = {}): Float32Array {
  const { width, height } = pixels;
  let x0 = 0;
  let y0 = 0;
  let w = width;
  let h = height;
  if (options.region) {
    ({ x: x0, y: y0, width: w, height: h } = options.region);
  } else if (spec.fit === "center-crop") {
    const side = Math.min(width, height);
    x0 = (width - side) / 2;
    y0 = (height - side) / 2;
    w = side;
    h = side;
  }
  const horizontal = filterTaps(x0, w, width, size);
  const vertical = filterTaps(y0, h, height, size);
  const { scale, offset } = NORMALIZATIONS[spec.normalization];
  // Hot loops: every array in a local, no property lookups or bounds-checked helpers inside.
  const hFirst = horizontal.first;
  const hCount = horizontal.count;
  const hWeights = horizontal.weights;
  const hMax = horizontal.maxTaps;
  const vFirst = vertical.first;
  const vCount = vertical.count;
  const vWeights = vertical.weights;
  const vMax = vertical.maxTaps;

  // Horizontal pass over only the rows the vertical pass will read, into a float buffer.
  const rowFirst = vFirst[0] as number;
  const rowLast = (vFirst[size - 1] as number) + (vCount[size - 1] as number);
  const rows = rowLast - rowFirst;
  const needed = rows * size * 3;
  if (needed <= SCRATCH_MAX && scratch.length < needed) scratch = new Float32Array(needed);
  const tmp = needed <= SCRATCH_MAX ? scratch : new Float32Array(needed);
  const src = pixels.data;
  const c = pixels.channels;
  const rowStride = width * c;
  // Version 2 composites alpha onto the background, pixel by pixel, before any resampling. Two copies
  // of the horizontal loop on purpose: one loop with the alpha term behind a flag gives identical output
  // but measured 0.5–4 % slower on a 500×375 photo (2026-11-29), on the hot path of training and the edge.
  const composite = c === 4 && spec.version >= 2;
  const [bgR, bgG, bgB] = spec.background ?? WHITE;
  for (let y = 0; y < rows && composite; y++) {
    const rowBase = (y + rowFirst) * rowStride;
    let t = y * size * 3;
    for (let ox = 0; ox < size; ox++) {
      const n = hCount[ox] as number;
      const wBase = ox * hMax;
      let p = rowBase + (hFirst[ox] as number) * c;
      let r = 0;
      let g = 0;
      let b = 0;
      for (let k = 0; k < n; k++, p += c) {
        const wt = hWeights[wBase + k] as number;
        const a = (src[p + 3] as number) / 255;
        const under = 1 - a;
        r += ((src[p] as number) * a + bgR * under) * wt;
        g += ((src[p + 1] as number) * a + bgG * under) * wt;
        b += ((src[p + 2] as number) * a + bgB * under) * wt;
      }
      tmp[t++] = r;
      tmp[t++] = g;
      tmp[t++] = b;
    }
  }
  for (let y = 0; y < rows && !composite; y++) {
    const rowBase = (y + rowFirst) * rowStride;
    let t = y * size * 3;
    for (let ox = 0; ox < size; ox++) {
      const n = hCount[ox] as number;
      const wBase = ox * hMax;
      let p = rowBase + (hFirst[ox] as number) * c;
      let r = 0;
      let g = 0;
      let b = 0;
      for (let k = 0; k < n; k++, p += c) {
        const wt = hWeights[wBase + k] as number;
        r += (src[p] as number) * wt;
        g += (src[p + 1] as number) * wt;
        b += (src[p + 2] as number) * wt;
      }
      tmp[t++] = r;
      tmp[t++] = g;
      tmp[t++] = b;
    }
  }
  // Vertical pass, row by row (sequential memory), then round to 8 bits and normalise.
  const out = options.into ? options.into.data.subarray(options.into.offset, options.into.offset + size * size * 3) : new Float32Array(size * size * 3);
  if (out.length !== size * size * 3) throw new RangeError("preprocess: the target has no room for the image");
  const flip = options.flip === true;
  const rowLen = size * 3;
  const acc = new Float32Array(rowLen);
  for (let oy = 0; oy < size; oy++) {
    const first = (vFirst[oy] as number) - rowFirst;
    const n = vCount[oy] as number;
    const wBase = oy * vMax;
    // The first tap sets the row (0 + x·w is x·w exactly), the others add to it.
    const w0 = vWeights[wBase] as number;
    const base0 = first * rowLen;
    for (let i = 0; i < rowLen; i++) acc[i] = (tmp[base0 + i] as number) * w0;
    for (let k = 1; k < n; k++) {
      const wt = vWeights[wBase + k] as number;
      const base = (first + k) * rowLen;
      for (let i = 0; i < rowLen; i++) acc[i] = (acc[i] as number) + (tmp[base + i] as number) * wt;
    }
    const outRow = oy * rowLen;
    for (let ox = 0; ox < size; ox++) {
      const a = ox * 3;
      const o = outRow + (flip ? size - 1 - ox : ox) * 3;
      out[o] = clampByte(acc[a] as number) * scale + offset;
      out[o + 1] = clampByte(acc[a + 1] as number) * scale + offset;
      out[o + 2] = clampByte(acc[a + 2] as number) * scale + offset;
    }
  }
  return out;
}

const WHITE = [255, 255, 255] as const;
/**
 * The horizontal pass's rows, kept between calls (preprocess is synchronous, so one buffer serves every
 * call): allocating it per image (1 MB for a 500×375 photo at 224 px) showed as GC time on training's
 * hot path. It is kept only up to 4 MB (a centre-cropped image of up to 1488 rows at 224 px); a larger
 * need (a tall image stretched whole) gets a buffer of its own for that call.
 */
const SCRATCH_MAX = 1 << 20;
let scratch = new Float32Array(0);

/** Round half up to an integer in [0, 255] (Math.round on the non-negative range, without the call). */
function clampByte(v: number): number {
  return v <= 0 ? 0 : v >= 255 ? 255 : (v + 0.5) | 0;
}

interface Taps {
  first: Int32Array;
  count: Int32Array;
  weights: Float32Array;
  maxTaps: number;
}

/**
 * Filter taps mapping the source span [start, start + span) of an axis of length `length` onto `out`
 * samples: a triangle filter, widened by the scale factor when shrinking (antialiasing), with
 * pixel centres at +0.5 and edge pixels clamped.
 */
function filterTaps(start: number, span: number, length: number, out: number): Taps {
  const scale = span / out;
  const support = Math.max(scale, 1);
  const maxTaps = Math.ceil(support) * 2 + 1;
  const first = new Int32Array(out);
  const count = new Int32Array(out);
  const weights = new Float32Array(out * maxTaps);
  for (let i = 0; i < out; i++) {
    const centre = start + (i + 0.5) * scale;
    const lo = Math.max(0, Math.floor(centre - support));
    const hi = Math.min(length, Math.ceil(centre + support));
    let total = 0;
    let n = 0;
    let firstTap = -1;
    for (let j = lo; j < hi && n < maxTaps; j++) {
      const wt = Math.max(0, 1 - Math.abs((j + 0.5 - centre) / support));
      if (wt === 0 && n === 0) continue; // skip leading zero taps (the hot loops run over n)
      if (firstTap < 0) firstTap = j;
      weights[i * maxTaps + n] = wt;
      total += wt;
      n++;
    }
    while (n > 0 && weights[i * maxTaps + n - 1] === 0) n--;
    if (total === 0) {
      // Degenerate span (a 1-pixel axis): take the nearest pixel.
      weights[i * maxTaps] = 1;
      first[i] = Math.min(length - 1, Math.max(0, Math.floor(centre)));
      count[i] = 1;
      continue;
    }
    for (let k = 0; k < n; k++) weights[i * maxTaps + k] = (weights[i * maxTaps + k] as number) / total;
    first[i] = firstTap;
    count[i] = n;
  }
  return { first, count, weights, maxTaps };
}
