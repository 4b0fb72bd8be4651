import { existsSync } from "node:fs";
import { join } from "node:path";

/** Reference material beside the repository (never committed); benchmarks skip what is absent. */
export const SHARED = process.env.EDGETUNE_SHARED ?? join(import.meta.dirname, "..", "..", "shared");
export const hasShared = (...parts: string[]) => existsSync(join(SHARED, ...parts));
// Bases come from ../shared/models (no weights are committed; model/base-sources.ts), never from a download.
if (hasShared("models")) process.env.EDGETUNE_BASES_DIR ||= join(SHARED, "models");
process.env.EDGETUNE_OFFLINE ||= "1";
/** The base the pipeline benchmarks (embedding, edge, memory, fine-tuning, retraining) were measured on. */
export const BENCH_BASE = "darknet-tiny";

export function arg(name: string, fallback?: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

export function machine(): string {
  return `${process.platform} ${process.arch}, ${(globalThis.navigator?.hardwareConcurrency ?? 0) || "?"} cores, Node ${process.version}`;
}

export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i] as number;
}
