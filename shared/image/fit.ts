import type { Pixels } from "../preprocess.ts";

/**
 * A copy of `pixels` scaled down to fit `maxSide` × `maxSide`, aspect kept, as RGBA, by area averaging
 * (each output pixel is the mean of the source area it covers, partial pixels weighted). For the copies
 * the edge captures for review: people look at them and training preprocesses them again, so a plain box
 * filter is enough; model inputs go through `preprocess`, never through this.
 */
export function fitWithin(pixels: Pixels, maxSide: number): Pixels {
  const { width, height, channels, data } = pixels;
  const scale = Math.min(1, maxSide / Math.max(width, height));
  const w = Math.max(1, Math.round(width * scale));
  const h = Math.max(1, Math.round(height * scale));
  const out = new Uint8Array(w * h * 4);
  const xs = spans(width, w);
  const ys = spans(height, h);
  let r = 0;
  let g = 0;
  let b = 0;
  let a = 0;
  for (let oy = 0; oy < h; oy++) {
    const ry = ys[oy] as Span;
    for (let ox = 0; ox < w; ox++) {
      const rx = xs[ox] as Span;
      r = g = b = a = 0;
      let total = 0;
      for (let j = 0; j < ry.weights.length; j++) {
        const wy = ry.weights[j] as number;
        const row = (ry.first + j) * width;
        for (let i = 0; i < rx.weights.length; i++) {
          const wgt = wy * (rx.weights[i] as number);
          const p = (row + rx.first + i) * channels;
          r += wgt * (data[p] as number);
          g += wgt * (data[p + 1] as number);
          b += wgt * (data[p + 2] as number);
          a += wgt * (channels === 4 ? (data[p + 3] as number) : 255);
          total += wgt;
        }
      }
      const q = (oy * w + ox) * 4;
      out[q] = Math.round(r / total);
      out[q + 1] = Math.round(g / total);
      out[q + 2] = Math.round(b / total);
      out[q + 3] = Math.round(a / total);
    }
  }
  return { data: out, width: w, height: h, channels: 4 };
}

interface Span {
  first: number;
  weights: number[];
}

/** For each of `n` output positions, the source pixels it covers out of `size` and how much of each. */
function spans(size: number, n: number): Span[] {
  const step = size / n;
  return Array.from({ length: n }, (_, o) => {
    const start = o * step;
    const end = start + step;
    const first = Math.floor(start);
    const weights: number[] = [];
    for (let s = first; s < Math.min(size, Math.ceil(end)); s++) weights.push(Math.min(end, s + 1) - Math.max(start, s));
    return { first, weights };
  });
}
