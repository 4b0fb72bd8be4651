import sharp from "sharp";
import { describe, expect, it } from "vitest";
import { hasMetadata } from "./metadata.ts";

/** Real files from libvips, with and without EXIF (sharp's withMetadata writes EXIF and its GPS-capable IFDs). */
const base = () => sharp({ create: { width: 24, height: 16, channels: 3, background: "#3a8" } });
const exif = { IFD0: { Copyright: "someone", ImageDescription: "at home" }, IFD3: { GPSLatitudeRef: "N", GPSLatitude: "48/1 51/1 0/1" } };

describe("hasMetadata", () => {
  for (const [format, type] of [
    ["jpeg", "image/jpeg"],
    ["png", "image/png"],
    ["webp", "image/webp"],
  ] as const) {
    it(`tells a ${format} with EXIF from a bare one`, async () => {
      const bare = new Uint8Array(await base().toFormat(format).toBuffer());
      const tagged = new Uint8Array(await base().withExif(exif).toFormat(format).toBuffer());
      expect(hasMetadata(bare, type)).toBe(false);
      expect(hasMetadata(tagged, type)).toBe(true);
    });
  }

  it("sees a PNG text chunk and a JPEG comment", async () => {
    const png = new Uint8Array(await base().png().toBuffer());
    // A tEXt chunk inserted after IHDR (offset 8 + 25).
    const text = new TextEncoder().encode("Comment\0hello");
    const chunk = new Uint8Array(12 + text.length);
    new DataView(chunk.buffer).setUint32(0, text.length);
    chunk.set(new TextEncoder().encode("tEXt"), 4);
    chunk.set(text, 8);
    const withText = new Uint8Array([...png.subarray(0, 33), ...chunk, ...png.subarray(33)]);
    expect(hasMetadata(withText, "image/png")).toBe(true);
    const jpeg = new Uint8Array(await base().jpeg().toBuffer());
    const comment = [0xff, 0xfe, 0x00, 0x07, ...new TextEncoder().encode("hello")];
    expect(hasMetadata(new Uint8Array([...jpeg.subarray(0, 2), ...comment, ...jpeg.subarray(2)]), "image/jpeg")).toBe(true);
  });

  it("counts what it cannot walk, and GIFs, as carrying metadata", async () => {
    expect(hasMetadata(new Uint8Array([0xff, 0xd8, 0x00, 0x00, 0x00]), "image/jpeg")).toBe(true);
    expect(hasMetadata(new Uint8Array(await base().png().toBuffer()).subarray(0, 20), "image/png")).toBe(true);
    expect(hasMetadata(new Uint8Array(await base().gif().toBuffer()), "image/gif")).toBe(true);
  });
});
