import { mulberry32 } from "../dataset/augment.ts";

/**
 * Stratified k-fold assignment of held-out rows: every label's rows spread evenly over the folds in a
 * seeded order, so a fold never lacks a label that others have. Folds = min(k, rows); one row or none
 * gives a single fold (nothing to cross-fit).
 */
export function stratifiedFolds(truth: readonly number[], k: number, seed: number): { folds: number; foldOf: Int32Array } {
  const folds = Math.max(1, Math.min(k, truth.length));
  const foldOf = new Int32Array(truth.length);
  const rand = mulberry32(seed);
  const byLabel = new Map<number, number[]>();
  truth.forEach((t, i) => {
    byLabel.set(t, [...(byLabel.get(t) ?? []), i]);
  });
  let next = 0;
  for (const rows of [...byLabel.entries()].sort((a, b) => a[0] - b[0]).map(([, r]) => r)) {
    // Fisher–Yates with the seeded generator, then dealt round-robin, continuing where the last label stopped.
    for (let i = rows.length - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1));
      [rows[i], rows[j]] = [rows[j] as number, rows[i] as number];
    }
    for (const row of rows) foldOf[row] = next++ % folds;
  }
  return { folds, foldOf };
}

/**
 * Out-of-fold application of something fitted on rows: for each fold, `fitOn` sees the other folds'
 * rows only and `apply` maps this fold's rows with the result. No row is ever scored by a fit that saw it.
 */
export function crossFitted<F, R>(
  rows: number,
  split: { folds: number; foldOf: Int32Array },
  fitOn: (train: number[]) => F,
  apply: (fitted: F, row: number) => R,
): R[] {
  const out: R[] = new Array(rows);
  for (let f = 0; f < split.folds; f++) {
    const train: number[] = [];
    const test: number[] = [];
    for (let i = 0; i < rows; i++) (split.foldOf[i] === f && split.folds > 1 ? test : train).push(i);
    // A single fold has nothing to hold out: its rows are scored by the fit on all of them.
    const fitted = fitOn(train);
    for (const i of split.folds > 1 ? test : train) out[i] = apply(fitted, i);
  }
  return out;
}
