/**
 * How the CLI answers: for people, sentences and aligned tables on stdout; for scripts, `--json` (one
 * JSON object per line, the same fields every time). Logs and progress go to stderr either way, so
 * stdout stays parseable.
 */
/**
 * Text from storage (labels, capture records, reasons, model and file names) made safe for a terminal:
 * every control character (C0, DEL, C1: ESC and CSI start the sequences that move the cursor, rewrite
 * lines or set the window title) and every invisible format character (zero-width, direction overrides)
 * is shown as a visible escape (`\x1b`, `\u200b`), so what the operator reads is what is stored.
 * `keepNewlines`: for whole messages whose line breaks are our own.
 */
export function safeText(text: string, keepNewlines = false): string {
  return text.replace(/[\p{Cc}\p{Cf}]/gu, (c) => {
    if (keepNewlines && c === "\n") return c;
    const code = c.codePointAt(0) as number;
    return code <= 0xff ? `\\x${code.toString(16).padStart(2, "0")}` : `\\u${code.toString(16).padStart(4, "0")}`;
  });
}

export interface OutputOptions {
  json?: boolean;
}

/**
 * Writes `value` as one JSON line with --json (JSON escapes controls), else the `human` text, made safe:
 * every human-readable answer goes through here or `say`.
 */
export function emit(o: OutputOptions, value: unknown, human: string): void {
  process.stdout.write(o.json ? `${JSON.stringify(value)}\n` : `${safeText(human, true)}\n`);
}

/** A line for people on stderr (warnings, refusals, empty listings), made safe like `emit`. */
export function say(text: string): void {
  process.stderr.write(`${safeText(text, true)}\n`);
}

/**
 * A list: one JSON object per item with --json; else a table, or `empty` (on stderr: nothing to parse)
 * when there are no items.
 */
export function emitList<T>(o: OutputOptions, items: readonly T[], empty: string, header: string[], row: (item: T) => string[]): void {
  if (o.json) for (const item of items) emit(o, item, "");
  else if (items.length === 0) say(empty);
  else
    emit(
      o,
      null,
      table(
        header,
        items.map((item) => row(item).map((cell) => safeText(cell))),
      ),
    );
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
