/**
 * The structure of a JPEG as libjpeg (and so mozjpeg at the edge and libvips/sharp in training) reads
 * it, without decoding a pixel: the frame's size and components, and how many scans follow.
 *
 * Why not a header sniffer: sniffers and decoders can disagree. libjpeg skips garbage and any number of
 * 0xFF fill bytes before a marker and takes the first SOF it meets (a second one is an error); a
 * sniffer that steps segment by segment can be steered past the real frame to a small decoy SOF while
 * the decoder allocates the real 20000×20000 one. This walker follows jdmarker.c's `next_marker`, so
 * the size it reports is the size the decoder will allocate. The scan count bounds the work of a
 * progressive JPEG, whose scans a file may repeat without limit (libjpeg-turbo's `-maxscans` exists
 * for this).
 */
export interface JpegStructure {
  width: number;
  height: number;
  components: number;
  progressive: boolean;
  /** Start-of-scan markers, in the part of the file that was read. */
  scans: number;
}

/** Far above what encoders write (libjpeg's progressive script: 10 scans; baseline: 1). */
export const MAX_JPEG_SCANS = 64;

export class JpegStructureError extends Error {}
/** More scans than `maxScans`: decoding it would cost many times a normal image. */
export class JpegTooManyScansError extends JpegStructureError {}

const SOI = 0xd8;
const EOI = 0xd9;
const SOS = 0xda;

function isSof(marker: number): boolean {
  return marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc;
}

export function inspectJpeg(bytes: Uint8Array, maxScans = MAX_JPEG_SCANS): JpegStructure {
  if (bytes[0] !== 0xff || bytes[1] !== SOI) throw new JpegStructureError("not a JPEG (no start-of-image marker)");
  let frame: Omit<JpegStructure, "scans"> | undefined;
  let scans = 0;
  let i = 2;
  const u16 = (at: number) => ((bytes[at] as number) << 8) | (bytes[at + 1] as number);
  for (;;) {
    // next_marker: skip non-FF bytes, then FF fill bytes; FF 00 is stuffed data, not a marker.
    let marker = 0;
    while (i < bytes.length) {
      while (i < bytes.length && bytes[i] !== 0xff) i++;
      while (i < bytes.length && bytes[i] === 0xff) i++;
      if (i >= bytes.length) break;
      marker = bytes[i++] as number;
      if (marker !== 0) break;
      marker = 0;
    }
    if (marker === 0 || marker === EOI) break; // end of data: the decoder stops here too
    if (marker === SOI) throw new JpegStructureError("a second start-of-image marker");
    if ((marker >= 0xd0 && marker <= 0xd7) || marker === 0x01) continue; // RSTn, TEM: no length
    if (i + 2 > bytes.length) break;
    const length = u16(i);
    if (length < 2) throw new JpegStructureError(`marker 0x${marker.toString(16)} has a bad length`);
    if (isSof(marker)) {
      if (frame) throw new JpegStructureError("two frame (SOF) markers");
      if (i + 8 > bytes.length) throw new JpegStructureError("the frame header is truncated");
      frame = { height: u16(i + 3), width: u16(i + 5), components: bytes[i + 7] as number, progressive: marker === 0xc2 || marker === 0xca };
      if (frame.width === 0 || frame.height === 0) throw new JpegStructureError("the frame has no size (DNL is not supported)");
    } else if (marker === SOS) {
      if (!frame) throw new JpegStructureError("a scan before the frame header");
      if (++scans > maxScans) throw new JpegTooManyScansError(`more than ${maxScans} scans`);
      // Skip the header, then the entropy-coded data up to the next marker (not FF 00, not RSTn, not fill).
      i += length;
      while (i < bytes.length) {
        if (bytes[i] !== 0xff) {
          i++;
          continue;
        }
        let j = i + 1;
        while (j < bytes.length && bytes[j] === 0xff) j++;
        const next = bytes[j];
        if (next === undefined || (next !== 0 && !(next >= 0xd0 && next <= 0xd7))) break;
        i = j + 1;
      }
      continue;
    }
    i += length;
  }
  if (!frame) throw new JpegStructureError("no frame (SOF) marker");
  return { ...frame, scans };
}
