import sharp from "sharp";
import { describe, expect, it } from "vitest";
import { fitWithin } from "./fit.ts";

describe("fitWithin", () => {
  it("averages whole blocks exactly at integer factors (the reference: the block means)", () => {
    const width = 6;
    const height = 4;
    const data = new Uint8Array(width * height * 3).map((_, i) => (i * 37) % 256);
    const out = fitWithin({ data, width, height, channels: 3 }, 3);
    expect([out.width, out.height, out.channels]).toEqual([3, 2, 4]);
    for (let oy = 0; oy < 2; oy++)
      for (let ox = 0; ox < 3; ox++)
        for (let c = 0; c < 3; c++) {
          let sum = 0;
          for (let dy = 0; dy < 2; dy++) for (let dx = 0; dx < 2; dx++) sum += data[((oy * 2 + dy) * width + ox * 2 + dx) * 3 + c] as number;
          expect(out.data[(oy * 3 + ox) * 4 + c]).toBe(Math.round(sum / 4));
        }
    expect(out.data[3]).toBe(255);
  });

  it("keeps the aspect and stays within a pixel or two of libvips' box reduction on a real image", async () => {
    const { data, info } = await sharp({ create: { width: 640, height: 480, channels: 3, background: "#000" } })
      .composite([{ input: Buffer.from('<svg width="640" height="480"><circle cx="320" cy="240" r="200" fill="#3a8"/></svg>') }])
      .removeAlpha()
      .raw()
      .toBuffer({ resolveWithObject: true });
    const out = fitWithin({ data: new Uint8Array(data), width: info.width, height: info.height, channels: 3 }, 160);
    expect([out.width, out.height]).toEqual([160, 120]);
    const ref = await sharp(data, { raw: { width: info.width, height: info.height, channels: 3 } })
      .resize(160, 120, { kernel: "nearest" })
      .raw()
      .toBuffer();
    // The disc's centre and a corner are flat areas: both methods must agree there.
    expect(out.data[(60 * 160 + 80) * 4 + 1]).toBe(ref[(60 * 160 + 80) * 3 + 1]);
    expect(out.data[1]).toBe(ref[1]);
  });

  it("leaves a small image at its size", () => {
    const out = fitWithin({ data: new Uint8Array(4 * 3 * 4).fill(9), width: 4, height: 3, channels: 4 }, 512);
    expect([out.width, out.height]).toEqual([4, 3]);
    expect([...out.data.slice(0, 4)]).toEqual([9, 9, 9, 9]);
  });
});
