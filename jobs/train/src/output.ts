/**
 * How the CLI answers: for people, sentences and aligned tables on stdout; for scripts, `--json` (one
 * JSON object per line, the same fields every time). Logs and progress go to stderr either way, so
 * stdout stays parseable.
 */
export interface OutputOptions {
  json?: boolean;
}

/** Writes `value` as one JSON line with --json, else the `human` text. */
export function emit(o: OutputOptions, value: unknown, human: string): void {
  process.stdout.write(o.json ? `${JSON.stringify(value)}\n` : `${human}\n`);
}

/**
 * A list: one JSON object per item with --json; else a table, or `empty` (on stderr: nothing to parse)
 * when there are no items.
 */
export function emitList<T>(o: OutputOptions, items: readonly T[], empty: string, header: string[], row: (item: T) => string[]): void {
  if (o.json) for (const item of items) emit(o, item, "");
  else if (items.length === 0) process.stderr.write(`${empty}\n`);
  else emit(o, null, table(header, items.map(row)));
}

/** Columns padded to their widest cell; the last column is not padded (long reasons stay readable). */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i] ?? 0)))
      .join("  ")
      .trimEnd();
  return [line(header), ...rows.map(line)].join("\n");
}

/** A share as a percentage with one decimal. */
export const percent = (v: number | undefined) => (v === undefined ? "—" : `${(v * 100).toFixed(1)} %`);
