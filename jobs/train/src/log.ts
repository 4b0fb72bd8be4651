import cliProgress from "cli-progress";
import { safeText } from "./output.ts";

/**
 * Job output: a progress bar with ETA when a person watches a terminal, one JSON object per line
 * otherwise (CloudWatch, CI, the local dispatcher), so the same job is readable in both places.
 */
export interface Logger {
  info(message: string, fields?: Record<string, unknown>): void;
  warn(message: string, fields?: Record<string, unknown>): void;
  /** Progress of a phase; `done === total` ends it. */
  progress(phase: string, done: number, total: number): void;
}

export function createLogger(options: { json?: boolean; stream?: NodeJS.WriteStream; quiet?: boolean } = {}): Logger {
  const stream = options.stream ?? process.stderr;
  const json = options.json ?? !stream.isTTY;
  if (json) return jsonLogger(stream, options.quiet ?? false);
  let bar: cliProgress.SingleBar | undefined;
  let barPhase = "";
  const stop = () => {
    bar?.stop();
    bar = undefined;
  };
  return {
    info(message, fields) {
      stop();
      // Messages carry labels and names from storage: a terminal gets them made safe (output.ts).
      stream.write(`${safeText(`${message}${fields ? ` ${formatFields(fields)}` : ""}`, true)}\n`);
    },
    warn(message, fields) {
      stop();
      stream.write(`warning: ${safeText(`${message}${fields ? ` ${formatFields(fields)}` : ""}`, true)}\n`);
    },
    progress(phase, done, total) {
      if (!bar || barPhase !== phase) {
        stop();
        barPhase = phase;
        bar = new cliProgress.SingleBar(
          { format: `${phase.padEnd(22)} [{bar}] {value}/{total} | ETA {eta_formatted}`, stream, hideCursor: true },
          cliProgress.Presets.shades_classic,
        );
        bar.start(total, done);
      }
      bar.update(done);
      if (done >= total) stop();
    },
  };
}

function jsonLogger(stream: NodeJS.WritableStream, quiet: boolean): Logger {
  const write = (level: string, message: string, fields?: Record<string, unknown>) => {
    if (quiet && level === "progress") return;
    stream.write(`${JSON.stringify({ time: new Date().toISOString(), level, message, ...fields })}\n`);
  };
  const last = new Map<string, number>();
  return {
    info: (m, f) => write("info", m, f),
    warn: (m, f) => write("warn", m, f),
    progress(phase, done, total) {
      // At most one line per phase every 5 s, plus the last one.
      const now = Date.now();
      if (done < total && now - (last.get(phase) ?? 0) < 5000) return;
      last.set(phase, now);
      write("progress", phase, { done, total });
    },
  };
}

/** One of the job's JSON log lines as a person reads it ("message key=value …"); other lines as they are. */
export function formatLogLine(line: string): string {
  if (!line.startsWith("{")) return line;
  try {
    const { time: _time, level, message, ...fields } = JSON.parse(line) as Record<string, unknown>;
    if (typeof message !== "string") return line;
    if (level === "progress") return `${message} ${fields.done}/${fields.total}`;
    const rest = Object.keys(fields).length ? ` ${formatFields(fields)}` : "";
    return `${level === "warn" ? "warning: " : ""}${message}${rest}`;
  } catch {
    return line;
  }
}

function formatFields(fields: Record<string, unknown>): string {
  return Object.entries(fields)
    .map(([k, v]) => `${k}=${typeof v === "number" ? (Number.isInteger(v) ? v : v.toFixed(3)) : typeof v === "string" ? v : JSON.stringify(v)}`)
    .join(" ");
}

/** A logger that records everything, for tests. */
export function memoryLogger(): Logger & { lines: { level: string; message: string; fields?: Record<string, unknown> }[] } {
  const lines: { level: string; message: string; fields?: Record<string, unknown> }[] = [];
  return {
    lines,
    info: (message, fields) => lines.push({ level: "info", message, fields }),
    warn: (message, fields) => lines.push({ level: "warn", message, fields }),
    progress: (message, done, total) => lines.push({ level: "progress", message, fields: { done, total } }),
  };
}
