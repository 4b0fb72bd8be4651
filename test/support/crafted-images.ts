import { crc32 } from "node:zlib";
import { concatBytes } from "#shared/bytes.ts";

/**
 * Hostile JPEGs, built from a real small JPEG by rearranging its segments (issue #12's attacks, kept
 * small enough to generate in a test).
 */

interface Segment {
  marker: number;
  /** The whole segment, FF and marker included; for SOS, its entropy-coded data too. */
  bytes: Uint8Array;
}

/** A JPEG's segments in order (SOI and EOI excluded). Only for well-formed encoder output. */
export function jpegSegments(jpeg: Uint8Array): Segment[] {
  const out: Segment[] = [];
  let i = 2;
  while (i < jpeg.length) {
    const marker = jpeg[i + 1] as number;
    if (marker === 0xd9) break;
    const length = ((jpeg[i + 2] as number) << 8) | (jpeg[i + 3] as number);
    let end = i + 2 + length;
    if (marker === 0xda) {
      while (end < jpeg.length && !(jpeg[end] === 0xff && jpeg[end + 1] !== 0 && !((jpeg[end + 1] as number) >= 0xd0 && (jpeg[end + 1] as number) <= 0xd7)))
        end++;
    }
    out.push({ marker, bytes: jpeg.slice(i, end) });
    i = end;
  }
  return out;
}

const join = (parts: (Uint8Array | number[])[]) => concatBytes(parts.map((p) => Uint8Array.from(p)));

/**
 * The frame header moved behind a 0xFF fill byte and rewritten to `width`×`height`, with the original
 * small frame header as a decoy inside a comment placed where a segment-by-segment sniffer lands after
 * misreading the fill byte (its "length" is then 0xC0nn). libjpeg skips the fill byte and the comment
 * and allocates the big frame; image-size reports the decoy.
 */
export function sofBehindFillByte(jpeg: Uint8Array, width: number, height: number): Uint8Array {
  const segments = jpegSegments(jpeg);
  const sof = segments.find((s) => s.marker === 0xc0) as Segment;
  const big = sof.bytes.slice();
  new DataView(big.buffer).setUint16(5, height);
  new DataView(big.buffer).setUint16(7, width);
  const before = segments.filter((s) => s.marker >= 0xe0 && s.marker <= 0xef);
  const after = segments.filter((s) => s !== sof && !before.includes(s));
  // The sniffer resumes right after "FF FF" and reads C0 nn as a length: its next look is at C0 + that.
  const realLength = (big[2] as number) * 256 + (big[3] as number);
  const sniffJump = 0xc000 + (realLength >> 8);
  // From the C0 byte: the rest of the big SOF (big.length - 1 bytes), then the comment's FF FE + length.
  const padding = sniffJump - (big.length - 1) - 4;
  const comment = join([
    [0xff, 0xfe],
    [((padding + sof.bytes.length + 2) >> 8) & 0xff, (padding + sof.bytes.length + 2) & 0xff],
    new Uint8Array(padding),
    sof.bytes,
  ]);
  return join([[0xff, 0xd8], ...before.map((s) => s.bytes), [0xff], big, comment, ...after.map((s) => s.bytes), [0xff, 0xd9]]);
}

/** A progressive JPEG with its last scan repeated `times` more times (each repeat costs a full pass). */
export function repeatedScans(progressiveJpeg: Uint8Array, times: number): Uint8Array {
  const segments = jpegSegments(progressiveJpeg);
  const last = segments.filter((s) => s.marker === 0xda).at(-1) as Segment;
  return join([[0xff, 0xd8], ...segments.map((s) => s.bytes), ...Array.from({ length: times }, () => last.bytes), [0xff, 0xd9]]);
}

/** A GIF with its logical screen set to `screen` and its first frame's size to `frame` (offset kept). */
export function gifWithSizes(gif: Uint8Array, screen: [number, number], frame: [number, number]): Uint8Array {
  const out = gif.slice();
  const view = new DataView(out.buffer);
  view.setUint16(6, screen[0], true);
  view.setUint16(8, screen[1], true);
  // Past the header and screen descriptor, the global colour table if any, and any extension blocks.
  let i = 13 + ((out[10] as number) & 0x80 ? 3 * 2 ** (((out[10] as number) & 7) + 1) : 0);
  while (out[i] === 0x21) {
    i += 2;
    while ((out[i] as number) > 0) i += (out[i] as number) + 1;
    i += 1;
  }
  if (out[i] !== 0x2c) throw new Error("no image descriptor where one was expected");
  view.setUint16(i + 5, frame[0], true);
  view.setUint16(i + 7, frame[1], true);
  return out;
}

/**
 * Images that carry metadata where a header check does not look (issue #26): each still decodes to the
 * same pixels, and each hides `secret` (or a profile / EXIF block) in a place its decoder skips.
 */
const ascii = (text: string) => new TextEncoder().encode(text);

/** A JPEG segment (marker and payload; the length is filled in). */
export const jpegSegment = (marker: number, payload: Uint8Array) =>
  join([[0xff, marker, ((payload.length + 2) >> 8) & 0xff, (payload.length + 2) & 0xff], payload]);

/** `segment` inserted right after the first scan's data of a (progressive) JPEG: libjpeg reads markers between scans. */
export function afterFirstScan(jpeg: Uint8Array, segment: Uint8Array): Uint8Array {
  const segments = jpegSegments(jpeg);
  const first = segments.findIndex((s) => s.marker === 0xda);
  return join([[0xff, 0xd8], ...segments.slice(0, first + 1).map((s) => s.bytes), segment, ...segments.slice(first + 1).map((s) => s.bytes), [0xff, 0xd9]]);
}

/** The JPEG with its segments of `marker` (e.g. APP1, EXIF) moved to after the first scan. */
export function moveAfterFirstScan(jpeg: Uint8Array, marker: number): Uint8Array {
  const segments = jpegSegments(jpeg);
  const moved = segments.filter((s) => s.marker === marker);
  if (moved.length === 0) throw new Error(`no segment FF${marker.toString(16)} to move`);
  const rest = segments.filter((s) => s.marker !== marker);
  const first = rest.findIndex((s) => s.marker === 0xda);
  return join([
    [0xff, 0xd8],
    ...rest.slice(0, first + 1).map((s) => s.bytes),
    ...moved.map((s) => s.bytes),
    ...rest.slice(first + 1).map((s) => s.bytes),
    [0xff, 0xd9],
  ]);
}

/** A second APP0 after the JFIF one, carrying text. */
export function secondApp0(jpeg: Uint8Array, secret: string): Uint8Array {
  const segments = jpegSegments(jpeg);
  const app0 = segments.findIndex((s) => s.marker === 0xe0);
  const extra = jpegSegment(0xe0, ascii(`JFXX\0${secret}`));
  return join([[0xff, 0xd8], ...segments.slice(0, app0 + 1).map((s) => s.bytes), extra, ...segments.slice(app0 + 1).map((s) => s.bytes), [0xff, 0xd9]]);
}

/** Bytes after the end of the image (JPEG EOI, PNG IEND, or past a WebP's RIFF size). */
export const withTrailer = (image: Uint8Array, secret: string) => join([image, ascii(secret)]);

/** A PNG chunk with its CRC. */
export function pngChunk(type: string, data: Uint8Array): Uint8Array {
  const typed = join([ascii(type), data]);
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(typed, 4);
  view.setUint32(8 + data.length, crc32(typed));
  return out;
}

/** The PNG with `chunk` inserted right after IHDR (where eXIf and iCCP belong). */
export function pngWithChunk(png: Uint8Array, chunk: Uint8Array): Uint8Array {
  const ihdrEnd = 8 + 12 + new DataView(png.buffer, png.byteOffset).getUint32(8);
  return join([png.subarray(0, ihdrEnd), chunk, png.subarray(ihdrEnd)]);
}

/** The WebP with a RIFF chunk appended (its size field updated: the chunk is inside the file, not after it). */
export function webpWithChunk(webp: Uint8Array, type: string, data: Uint8Array): Uint8Array {
  const header = new Uint8Array(8);
  header.set(ascii(type));
  new DataView(header.buffer).setUint32(4, data.length, true);
  const out = join([webp, header, data, data.length % 2 ? [0] : []]);
  new DataView(out.buffer).setUint32(4, out.length - 8, true);
  return out;
}

/** The PNG with only its critical chunks (IHDR, PLTE, IDAT, IEND), as the edge's encoder writes captures (sharp adds pHYs). */
export function barePng(png: Uint8Array): Uint8Array {
  const view = new DataView(png.buffer, png.byteOffset, png.byteLength);
  const kept: Uint8Array[] = [png.subarray(0, 8)];
  for (let at = 8; at + 12 <= png.length; ) {
    const end = at + 12 + view.getUint32(at);
    const type = String.fromCharCode(...png.subarray(at + 4, at + 8));
    if (["IHDR", "PLTE", "IDAT", "IEND"].includes(type)) kept.push(png.subarray(at, end));
    at = end;
  }
  return join(kept);
}
