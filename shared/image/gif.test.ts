import sharp from "sharp";
import { describe, expect, it } from "vitest";
import { gifWithSizes } from "../../test/support/crafted-images.ts";
import { decodeGifFirstFrame, GifStructureError, inspectGif } from "./gif.ts";

/** RGB of every pixel as training decodes it (sharp, first page, alpha dropped). */
async function trainingRgb(gif: Uint8Array): Promise<Uint8Array> {
  return new Uint8Array(await sharp(gif, { pages: 1 }).toColourspace("srgb").removeAlpha().raw().toBuffer());
}

function rgbOf(rgba: Uint8Array | Uint8ClampedArray): Uint8Array {
  const out = new Uint8Array((rgba.length / 4) * 3);
  for (let i = 0, o = 0; i < rgba.length; i += 4, o += 3) out.set(rgba.subarray(i, i + 3), o);
  return out;
}

describe("GIF first frame", () => {
  it("decodes to the pixels training sees: photo-like, transparent, animated", async () => {
    const photo = await sharp({ create: { width: 64, height: 48, channels: 3, background: "#000", noise: { type: "gaussian", mean: 128, sigma: 60 } } })
      .gif()
      .toBuffer();
    const transparent = await sharp({ create: { width: 40, height: 30, channels: 4, background: { r: 200, g: 30, b: 30, alpha: 0 } } })
      .composite([{ input: { create: { width: 20, height: 10, channels: 4, background: { r: 10, g: 200, b: 10, alpha: 1 } } }, left: 5, top: 5 }])
      .gif()
      .toBuffer();
    // Three 24×24 frames of different colours, the second drawn smaller and offset by the encoder's optimiser.
    const raw = Buffer.alloc(24 * 72 * 3);
    for (let i = 0; i < 24 * 72; i++) raw.set(i < 24 * 24 ? [255, 128, 0] : i < 2 * 24 * 24 ? [0, 128, 255] : [20, 200, 20], i * 3);
    const animated = await sharp(raw, { raw: { width: 24, height: 72, channels: 3, pageHeight: 24 } })
      .gif({ loop: 0 })
      .toBuffer();
    expect((await sharp(animated).metadata()).pages).toBe(3);
    for (const gif of [photo, transparent, animated].map((b) => new Uint8Array(b))) {
      const inspected = inspectGif(gif);
      const mine = decodeGifFirstFrame(inspected, 1e6);
      expect({ width: inspected.width, height: inspected.height }).toEqual({ width: mine.width, height: mine.height });
      expect(rgbOf(mine.data)).toEqual(await trainingRgb(gif));
    }
  });

  it("refuses a GIF whose screen is over the pixel limit before decoding it", async () => {
    const gif = new Uint8Array(
      await sharp({ create: { width: 8, height: 8, channels: 3, background: "#000" } })
        .gif()
        .toBuffer(),
    );
    const huge = gif.slice();
    new DataView(huge.buffer).setUint16(6, 30000, true);
    new DataView(huge.buffer).setUint16(8, 30000, true);
    expect(inspectGif(huge)).toMatchObject({ width: 30000, height: 30000 });
    expect(() => decodeGifFirstFrame(inspectGif(huge), 8_000_000)).toThrow(/30000×30000/);
  });

  it("refuses a first frame larger than its screen (what omggif would allocate and walk), before decoding", async () => {
    const gif = new Uint8Array(
      await sharp({ create: { width: 8, height: 8, channels: 3, background: "#000" } })
        .gif()
        .toBuffer(),
    );
    const crafted = gifWithSizes(gif, [1, 1], [20000, 20000]); // a 1×1 screen around a 20000×20000 frame
    expect(() => inspectGif(crafted)).toThrow(GifStructureError);
    expect(() => inspectGif(crafted)).toThrow(/first frame \(20000×20000 at 0,0\) does not fit the 1×1 screen/);
  });
});
