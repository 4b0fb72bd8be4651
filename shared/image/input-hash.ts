/**
 * A difference hash (dHash, 64 bits) of a preprocessed model input — what the model sees, after the
 * crop, the alpha compositing and the resampling: the image is averaged down to 9×8 cells of grey
 * (the sum of the three normalised channels), and bit i says whether a cell is brighter than its right
 * neighbour. Resized, re-encoded or slightly brightened copies of an image land within a few bits of it;
 * distinct photos rarely do (measured in dataset/near-duplicates.ts). Computed during feature extraction
 * from the input already in memory, so it costs no extra decode.
 */
export function inputHash(data: Float32Array, offset: number, size: number): string {
  const cells = new Float64Array(9 * 8);
  // The cell column of every x, once (not a division per pixel); sums in the same order as before.
  const column = new Int32Array(size);
  for (let x = 0; x < size; x++) column[x] = Math.min(8, Math.floor((x * 9) / size));
  for (let y = 0; y < size; y++) {
    const row = Math.min(7, Math.floor((y * 8) / size)) * 9;
    let p = offset + y * size * 3;
    for (let x = 0; x < size; x++, p += 3) {
      const cell = row + (column[x] as number);
      cells[cell] = (cells[cell] as number) + (data[p] as number) + (data[p + 1] as number) + (data[p + 2] as number);
    }
  }
  let hex = "";
  for (let y = 0; y < 8; y++) {
    let byte = 0;
    for (let x = 0; x < 8; x++) byte = (byte << 1) | ((cells[y * 9 + x] as number) > (cells[y * 9 + x + 1] as number) ? 1 : 0);
    hex += byte.toString(16).padStart(2, "0");
  }
  return hex;
}

/** Bits that differ between two hashes of `inputHash`. */
export function hashDistance(a: string, b: string): number {
  let n = 0;
  for (let i = 0; i < a.length; i += 2) {
    let x = Number.parseInt(a.slice(i, i + 2), 16) ^ Number.parseInt(b.slice(i, i + 2), 16);
    while (x) {
      n += x & 1;
      x >>= 1;
    }
  }
  return n;
}
