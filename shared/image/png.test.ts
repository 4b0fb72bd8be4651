import sharp from "sharp";
import { describe, expect, it } from "vitest";
import { barePng, pngChunk, pngWithChunk, withTrailer } from "../../test/support/crafted-images.ts";
import { isBarePng, pngChunks } from "./png.ts";

const png = async () =>
  barePng(
    new Uint8Array(
      await sharp({ create: { width: 8, height: 8, channels: 3, background: "#0a0" } })
        .png()
        .toBuffer(),
    ),
  );
const secret = new TextEncoder().encode("GPS 48.85,2.35");

describe("PNG chunk walk", () => {
  it("passes the encoder's own IHDR/IDAT/IEND and nothing else", async () => {
    const plain = await png();
    expect(pngChunks(plain)?.types).toEqual(["IHDR", "IDAT", "IEND"]);
    expect(isBarePng(plain)).toBe(true);
    expect(isBarePng(withTrailer(plain, "GPS 48.85,2.35"))).toBe(false);
    for (const type of ["tEXt", "eXIf", "iCCP", "prIv", "pHYs"]) expect(isBarePng(pngWithChunk(plain, pngChunk(type, secret)))).toBe(false);
    expect(isBarePng(plain.subarray(0, plain.length - 6))).toBe(false); // cut inside IEND
    expect(isBarePng(new Uint8Array([0xff, 0xd8, 0xff, 0xe0]))).toBe(false);
  });
});
