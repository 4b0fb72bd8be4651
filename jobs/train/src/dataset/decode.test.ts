import sharp from "sharp";
import { describe, expect, it } from "vitest";
import { decodeImage, MAX_IMAGE_PIXELS } from "./decode.ts";

/** A small image of `channels` channels in `format`, from seeded noise. */
async function image(format: "jpeg" | "png" | "webp" | "gif" | "tiff", channels: 1 | 2 | 3 | 4, width = 24, height = 16): Promise<Uint8Array> {
  const raw = Buffer.from(Array.from({ length: width * height * channels }, (_, i) => (i * 2654435761) >>> 24));
  return new Uint8Array(await sharp(raw, { raw: { width, height, channels } }).toFormat(format).toBuffer());
}

describe("decodeImage", () => {
  it("keeps alpha where the image has it and gives RGB otherwise", async () => {
    expect((await decodeImage(await image("jpeg", 3))).channels).toBe(3);
    expect((await decodeImage(await image("jpeg", 1))).channels).toBe(3); // grey → sRGB
    expect((await decodeImage(await image("png", 3))).channels).toBe(3);
    expect((await decodeImage(await image("png", 4))).channels).toBe(4);
    expect((await decodeImage(await image("png", 2))).channels).toBe(4); // grey + alpha → sRGB + alpha
    expect((await decodeImage(await image("webp", 4))).channels).toBe(4);
    const gif = await decodeImage(await image("gif", 3));
    expect([gif.width, gif.height]).toEqual([24, 16]);
  });

  it("names a real format it does not take, and calls other bytes unreadable", async () => {
    await expect(decodeImage(await image("tiff", 3))).rejects.toThrow("unsupported format tiff (expected JPEG, PNG, WebP or GIF)");
    await expect(decodeImage(new TextEncoder().encode("hello, not an image"))).rejects.toThrow("not a readable image");
    await expect(decodeImage(new Uint8Array())).rejects.toThrow("empty file");
  });

  it("refuses an image over the pixel limit from its header, with its size", async () => {
    // A PNG header claiming 8000×8000 (64 MP) with almost no data: refused before any decoding.
    const side = Math.ceil(Math.sqrt(MAX_IMAGE_PIXELS)) + 1000;
    const big = await sharp({ create: { width: side, height: side, channels: 3, background: "#000" } })
      .png({ compressionLevel: 9 })
      .toBuffer();
    await expect(decodeImage(new Uint8Array(big))).rejects.toThrow(`image is ${side}×${side}, more than 50 megapixels`);
  });

  it("calls a truncated file of a known format corrupt, naming the format", async () => {
    const png = await image("png", 3, 64, 64);
    await expect(decodeImage(png.subarray(0, 60))).rejects.toThrow(/^corrupt png/);
  });
});
