import { crc32, deflateSync } from "node:zlib";
import sharp from "sharp";
import { describe, expect, it } from "vitest";
import { decodeImage, MAX_IMAGE_PIXELS } from "./decode.ts";

/** A small image of `channels` channels in `format`, from seeded noise. */
async function image(format: "jpeg" | "png" | "webp" | "gif" | "tiff", channels: 1 | 2 | 3 | 4, width = 24, height = 16): Promise<Uint8Array> {
  const raw = Buffer.from(Array.from({ length: width * height * channels }, (_, i) => (i * 2654435761) >>> 24));
  return new Uint8Array(await sharp(raw, { raw: { width, height, channels } }).toFormat(format).toBuffer());
}

/** A PNG of the given size with an empty pixel stream: valid signature and header chunk, nothing behind them. */
function pngHeader(width: number, height: number): Uint8Array {
  const chunk = (type: string, data: Uint8Array) => {
    const body = Buffer.concat([Buffer.from(type, "ascii"), data]);
    const out = Buffer.alloc(8 + data.length + 4);
    out.writeUInt32BE(data.length, 0);
    body.copy(out, 4);
    out.writeUInt32BE(crc32(body), 8 + data.length);
    return out;
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([8, 2, 0, 0, 0], 8); // 8-bit RGB
  const signature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  return new Uint8Array(Buffer.concat([signature, chunk("IHDR", ihdr), chunk("IDAT", deflateSync(Buffer.alloc(0))), chunk("IEND", new Uint8Array())]));
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
    // A PNG whose header claims 8071×8071 (65 MP) and whose pixel data is a few bytes: refused from
    // the header, before any decoding (a real one would be 195 MB of pixels).
    const side = Math.ceil(Math.sqrt(MAX_IMAGE_PIXELS)) + 1000;
    await expect(decodeImage(pngHeader(side, side))).rejects.toThrow(`image is ${side}×${side}, more than 50 megapixels`);
  });

  it("calls a truncated file of a known format corrupt, naming the format", async () => {
    const png = await image("png", 3, 64, 64);
    await expect(decodeImage(png.subarray(0, 60))).rejects.toThrow(/^corrupt png/);
  });
});
