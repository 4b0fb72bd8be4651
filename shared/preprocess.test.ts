import { describe, expect, it } from "vitest";
import { type Pixels, preprocess, preprocessingSchema } from "./preprocess.ts";

const spec = (normalization: "minus1-1" | "0-1" | "0-255", fit: "center-crop" | "stretch" = "center-crop") =>
  preprocessingSchema.parse({ version: 1, normalization, fit });

function image(width: number, height: number, channels: 3 | 4, f: (x: number, y: number, c: number) => number): Pixels {
  const data = new Uint8Array(width * height * channels);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) for (let c = 0; c < channels; c++) data[(y * width + x) * channels + c] = f(x, y, c);
  return { data, width, height, channels };
}

describe("preprocess", () => {
  it("keeps a flat colour flat at any scale and normalises per the base", () => {
    const px = image(37, 23, 4, (_x, _y, c) => [200, 100, 0, 7][c] as number);
    const out = preprocess(px, 16, spec("minus1-1"));
    expect(out.length).toBe(16 * 16 * 3);
    for (let i = 0; i < out.length; i += 3) {
      expect(out[i]).toBeCloseTo(200 / 127.5 - 1, 5);
      expect(out[i + 1]).toBeCloseTo(100 / 127.5 - 1, 5);
      expect(out[i + 2]).toBeCloseTo(-1, 5);
    }
    expect(preprocess(px, 4, spec("0-1"))[0]).toBeCloseTo(200 / 255, 5);
    expect(preprocess(px, 4, spec("0-255"))[1]).toBe(100);
  });

  it("is the identity at the same size", () => {
    const px = image(8, 8, 3, (x, y, c) => (x * 31 + y * 7 + c * 50) % 256);
    const out = preprocess(px, 8, spec("0-255"));
    expect(Array.from(out)).toEqual(Array.from(px.data));
  });

  it("averages 2×2 blocks when halving (antialiasing, no aliasing of a checkerboard)", () => {
    const px = image(16, 16, 3, (x, y) => ((x + y) % 2 === 0 ? 255 : 0));
    const out = preprocess(px, 8, spec("0-255"));
    // A pure bilinear sample without antialiasing would give 0 or 255; the antialiased filter gives grey.
    for (const v of out) expect(Math.abs(v - 127.5)).toBeLessThanOrEqual(40);
  });

  it("crops the centred square, or stretches the whole frame", () => {
    // Left third red, middle third green, right third blue.
    const px = image(30, 10, 3, (x, _y, c) => (Math.floor(x / 10) === c ? 255 : 0));
    const cropped = preprocess(px, 10, spec("0-255"));
    for (let i = 0; i < cropped.length; i += 3) expect([cropped[i], cropped[i + 1], cropped[i + 2]]).toEqual([0, 255, 0]);
    const stretched = preprocess(px, 3, spec("0-255", "stretch"));
    // Each output pixel is dominated by its own third (the triangle filter blends in the neighbours).
    for (let px3 = 0; px3 < 3; px3++) {
      const rgb = [stretched[px3 * 3], stretched[px3 * 3 + 1], stretched[px3 * 3 + 2]] as number[];
      expect(rgb.indexOf(Math.max(...rgb))).toBe(px3);
    }
  });

  it("interpolates linearly when enlarging", () => {
    const px = image(2, 1, 3, (x) => (x === 0 ? 0 : 200));
    const out = preprocess(px, 4, spec("0-255", "stretch"));
    // Output centres at 0.25, 0.75, 1.25, 1.75 of a 2-pixel row with centres 0.5 and 1.5.
    expect([out[0], out[3], out[6], out[9]]).toEqual([0, 50, 150, 200]);
  });

  it("handles a 1×1 image", () => {
    const out = preprocess(
      image(1, 1, 3, () => 9),
      4,
      spec("0-255"),
    );
    expect(new Set(out)).toEqual(new Set([9]));
  });

  it("rejects an unknown preprocessing version or normalisation", () => {
    expect(preprocessingSchema.safeParse({ version: 3, normalization: "0-1" }).success).toBe(false); // 1 and 2 exist
    expect(preprocessingSchema.safeParse({ version: 1, normalization: "imagenet" }).success).toBe(false);
  });
});

describe("preprocess options", () => {
  it("mirrors with flip and reads only the given region", () => {
    const px = image(4, 1, 3, (x) => x * 60);
    const flipped = preprocess(px, 4, spec("0-255", "stretch"), { flip: true });
    expect([flipped[0], flipped[3], flipped[6], flipped[9]]).toEqual([180, 120, 60, 0]);
    const region = preprocess(
      image(4, 4, 3, (x, y) => (x >= 2 && y >= 2 ? 200 : 10)),
      2,
      spec("0-255"),
      { region: { x: 2, y: 2, width: 2, height: 2 } },
    );
    expect(new Set(region)).toEqual(new Set([200]));
  });

  it("writes into a batch at an offset, the same numbers as on its own, and refuses a target too small", () => {
    const px = image(7, 5, 3, (x, y, c) => (x * 31 + y * 17 + c * 5) % 256);
    const alone = preprocess(px, 4, spec("minus1-1"));
    const batch = new Float32Array(3 * 48).fill(9);
    const view = preprocess(px, 4, spec("minus1-1"), { into: { data: batch, offset: 48 } });
    expect(view).toEqual(alone);
    expect(batch.subarray(48, 96)).toEqual(alone);
    expect(new Set([...batch.subarray(0, 48), ...batch.subarray(96)])).toEqual(new Set([9]));
    expect(() => preprocess(px, 4, spec("minus1-1"), { into: { data: batch, offset: 100 } })).toThrow(RangeError);
  });
});

describe("preprocessing version 2: transparency", () => {
  const v2 = preprocessingSchema.parse({ version: 2, normalization: "0-255", background: [255, 255, 255] });
  // The same visible picture (a green square on a transparent field) with different colours hidden
  // under the transparent pixels, as two tools or sources write them.
  const icon = (hidden: [number, number, number]) =>
    image(24, 24, 4, (x, y, c) => {
      const inside = x >= 6 && x < 18 && y >= 6 && y < 18;
      if (c === 3) return inside ? 255 : 0;
      return inside ? ([20, 180, 40][c] as number) : (hidden[c] as number);
    });

  it("composites onto the background, so colours hidden under transparent pixels do not matter", () => {
    const black = preprocess(icon([0, 0, 0]), 12, v2);
    const magenta = preprocess(icon([255, 0, 255]), 12, v2);
    expect(Array.from(magenta)).toEqual(Array.from(black));
    expect(Array.from(black.subarray(0, 3))).toEqual([255, 255, 255]); // a corner: the background
    // Version 1 read the hidden colours (what old models were trained with, and keep).
    const v1 = preprocessingSchema.parse({ version: 1, normalization: "0-255" });
    expect(Array.from(preprocess(icon([255, 0, 255]), 12, v1))).not.toEqual(Array.from(preprocess(icon([0, 0, 0]), 12, v1)));
  });

  it("blends partial alpha with the background before resampling, and leaves opaque RGB images as version 1 does", () => {
    const half = image(4, 4, 4, (_x, _y, c) => [255, 0, 0, 128][c] as number);
    const out = preprocess(half, 4, v2);
    expect(Array.from(out.subarray(0, 3))).toEqual([255, 127, 127]); // 255·128/255 + 255·127/255, 0 + 255·127/255
    const rgb = image(9, 7, 3, (x, y, c) => (x * 29 + y * 11 + c * 60) % 256);
    const v1 = preprocessingSchema.parse({ version: 1, normalization: "0-255" });
    expect(Array.from(preprocess(rgb, 5, v2))).toEqual(Array.from(preprocess(rgb, 5, v1)));
  });
});
