import { concatBytes } from "../../shared/bytes.ts";

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
