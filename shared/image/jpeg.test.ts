import { imageSize } from "image-size";
import sharp from "sharp";
import { describe, expect, it } from "vitest";
import { repeatedScans, sofBehindFillByte } from "../../test/support/crafted-images.ts";
import { inspectJpeg, JpegStructureError, JpegTooManyScansError } from "./jpeg.ts";

const photo = () => sharp({ create: { width: 160, height: 120, channels: 3, background: "#3a7" } });

describe("inspectJpeg", () => {
  it("reads size, components and scans of real encoder output as the decoder does", async () => {
    for (const [name, s, components] of [
      ["baseline", photo().jpeg(), 3],
      ["progressive", photo().jpeg({ progressive: true }), 3],
      ["greyscale", photo().toColourspace("b-w").jpeg(), 1],
      ["CMYK", photo().toColourspace("cmyk").jpeg(), 4],
    ] as const) {
      const bytes = new Uint8Array(await s.toBuffer());
      const meta = await sharp(bytes).metadata();
      const jpeg = inspectJpeg(bytes);
      expect([name, jpeg.width, jpeg.height, jpeg.components]).toEqual([name, meta.width, meta.height, components]);
      expect(jpeg.scans).toBeGreaterThanOrEqual(name === "progressive" ? 2 : 1);
      expect(jpeg.progressive).toBe(name === "progressive");
    }
  });

  it("finds the frame behind a fill byte that steers a segment-by-segment sniffer to a decoy", async () => {
    const small = new Uint8Array(
      await sharp({ create: { width: 16, height: 16, channels: 3, background: "#08f" } })
        .jpeg()
        .toBuffer(),
    );
    const crafted = sofBehindFillByte(small, 20000, 20000);
    // The bypass this defends against: the sniffer reads the decoy, libjpeg (sharp) the real frame.
    expect(imageSize(crafted)).toMatchObject({ width: 16, height: 16 });
    expect(await sharp(crafted, { limitInputPixels: false }).metadata()).toMatchObject({ width: 20000, height: 20000 });
    expect(inspectJpeg(crafted)).toMatchObject({ width: 20000, height: 20000 });
  });

  it("refuses a progressive JPEG whose scans repeat past the limit, and counts them up to it", async () => {
    const progressive = new Uint8Array(await photo().jpeg({ progressive: true }).toBuffer());
    const scans = inspectJpeg(progressive).scans;
    expect(inspectJpeg(repeatedScans(progressive, 64 - scans)).scans).toBe(64);
    expect(() => inspectJpeg(repeatedScans(progressive, 65 - scans))).toThrow(JpegTooManyScansError);
  });

  it("refuses structures libjpeg refuses: no SOI, two frames, a scan before the frame, no frame", async () => {
    const bytes = new Uint8Array(await photo().jpeg().toBuffer());
    const sofAt = bytes.findIndex((b, i) => b === 0xff && bytes[i + 1] === 0xc0);
    const sofLength = ((bytes[sofAt + 2] as number) << 8) | (bytes[sofAt + 3] as number);
    const sof = bytes.slice(sofAt, sofAt + 2 + sofLength);
    const twoFrames = new Uint8Array([...bytes.slice(0, sofAt), ...sof, ...bytes.slice(sofAt)]);
    const noFrame = new Uint8Array([...bytes.slice(0, sofAt), ...bytes.slice(sofAt + 2 + sofLength)]);
    expect(() => inspectJpeg(bytes.slice(2))).toThrow(/no start-of-image/);
    expect(() => inspectJpeg(twoFrames)).toThrow(/two frame/);
    expect(() => inspectJpeg(noFrame)).toThrow(JpegStructureError);
    expect(() => inspectJpeg(bytes.slice(0, 20))).toThrow(/no frame/);
  });
});
