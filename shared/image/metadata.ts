/**
 * Whether an image file carries metadata beyond its pixels: EXIF (camera, time, often GPS position), XMP,
 * IPTC, comments, PNG text chunks. The edge stores a captured input as sent only when this says no;
 * otherwise it stores a PNG re-encoded from the decoded pixels, which carries none. Walks the container
 * structure only (JPEG markers up to the first scan, PNG chunks, RIFF chunks); anything it cannot walk
 * counts as carrying metadata, so a malformed file is never stored as sent.
 */
export function hasMetadata(bytes: Uint8Array, contentType: string): boolean {
  try {
    if (contentType === "image/jpeg") return jpegHasMetadata(bytes);
    if (contentType === "image/png") return pngHasMetadata(bytes);
    if (contentType === "image/webp") return webpHasMetadata(bytes);
  } catch {
    return true;
  }
  return true;
}

function jpegHasMetadata(b: Uint8Array): boolean {
  let p = 2;
  while (p + 2 <= b.length) {
    if (b[p] !== 0xff) return true;
    const marker = b[p + 1] as number;
    if (marker === 0xff) {
      p++; // fill byte
      continue;
    }
    if (marker === 0xd8 || (marker >= 0xd0 && marker <= 0xd7) || marker === 0x01) {
      p += 2;
      continue;
    }
    if (marker === 0xda) return false; // start of scan: no header segment said metadata
    // APP1–APP15 (EXIF, XMP, ICC, IPTC, Adobe…) and COM; APP0 is the JFIF header.
    if ((marker >= 0xe1 && marker <= 0xef) || marker === 0xfe) return true;
    if (p + 4 > b.length) return true;
    p += 2 + (((b[p + 2] as number) << 8) | (b[p + 3] as number));
  }
  return true;
}

const PNG_METADATA = new Set(["tEXt", "zTXt", "iTXt", "eXIf", "tIME"]);
function pngHasMetadata(b: Uint8Array): boolean {
  let p = 8;
  while (p + 8 <= b.length) {
    const length = (((b[p] as number) << 24) | ((b[p + 1] as number) << 16) | ((b[p + 2] as number) << 8) | (b[p + 3] as number)) >>> 0;
    const type = String.fromCharCode(...b.subarray(p + 4, p + 8));
    if (PNG_METADATA.has(type)) return true;
    if (type === "IEND") return false;
    p += 12 + length;
  }
  return true;
}

function webpHasMetadata(b: Uint8Array): boolean {
  let p = 12;
  while (p + 8 <= b.length) {
    const type = String.fromCharCode(...b.subarray(p, p + 4));
    if (type === "EXIF" || type === "XMP ") return true;
    const size = ((b[p + 4] as number) | ((b[p + 5] as number) << 8) | ((b[p + 6] as number) << 16) | ((b[p + 7] as number) << 24)) >>> 0;
    p += 8 + size + (size & 1);
  }
  return p !== b.length;
}
