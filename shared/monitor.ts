import { z } from "zod";
import type { ArtifactMetadata } from "./contracts/artifact.ts";
import { addCounts, CONFIDENCE_BINS, type Counters, countersSchema, noCounts } from "./contracts/capture.ts";
import { nameSchema, versionSchema } from "./contracts/common.ts";
import { tryParseContractJson } from "./contracts/parse.ts";

/**
 * Watching a served model: the edge's counter deltas added up per UTC day and compared with what the
 * served version did on its held-out split. Two drift signals, each needing `MIN_REQUESTS` answers that day:
 *  - low confidence: the share of answers under the threshold is over twice the held-out share and at
 *    least 10 points above it;
 *  - label shift: the predicted-label shares moved from the held-out ones by more than 0.3 in one label
 *    (L-infinity distance; 0.3 is Vertex AI Model Monitoring's default for categorical features).
 * Used by `edgetune monitor` and by the nightly job, which writes the summary the web console shows.
 */
export const MIN_REQUESTS = 30;
export const LABEL_SHIFT_THRESHOLD = 0.3;

export const daySummarySchema = z.object({
  day: z.string(),
  versions: z.array(versionSchema),
  requests: z.number().int(),
  labels: z.record(z.string(), z.number().int()),
  confidence: z.array(z.number().int()).length(CONFIDENCE_BINS),
  lowConfidence: z.number().int(),
  captured: z.number().int(),
  overCap: z.number().int(),
  busy: z.number().int().default(0),
  failed: z.number().int(),
  optedOut: z.number().int(),
  drift: z.array(z.string()),
});
export type DaySummary = z.output<typeof daySummarySchema>;

export const referenceSchema = z.object({
  version: versionSchema,
  evaluatedOn: z.number().int(),
  /** Predicted-label shares on the held-out split (column sums of the confusion matrix). */
  labels: z.record(z.string(), z.number()),
  /**
   * Share of held-out answers under the threshold, exact (times `evaluatedOn` it is a whole count): from
   * the report's per-image scores, or from the 10-bin histogram when the threshold is a bin edge. Null
   * when it cannot be known exactly (an older version, another threshold): never interpolated.
   */
  lowConfidence: z.number().nullable(),
});
export type Reference = z.output<typeof referenceSchema>;

export const monitorSummarySchema = z.object({
  schemaVersion: z.literal(1),
  model: nameSchema,
  writtenAt: z.iso.datetime(),
  threshold: z.number(),
  reference: referenceSchema.nullable(),
  days: z.array(daySummarySchema),
});
export type MonitorSummary = z.output<typeof monitorSummarySchema>;

/** Adds counter deltas up per day (the day of their `from`), oldest day first. */
export function sumByDay(deltas: readonly Counters[]): Omit<DaySummary, "drift">[] {
  const days = new Map<string, Omit<DaySummary, "drift">>();
  for (const d of deltas) {
    const day = d.from.slice(0, 10);
    let s = days.get(day);
    if (!s) {
      s = { day, versions: [], ...noCounts() };
      days.set(day, s);
    }
    if (!s.versions.includes(d.version)) s.versions.push(d.version);
    addCounts(s, d);
  }
  return [...days.values()].sort((a, b) => a.day.localeCompare(b.day));
}

/**
 * What the served version did on its held-out split. `confusion` is the report's matrix (rows true,
 * columns predicted). The low-confidence share at `threshold` is read off the 10-bin histogram,
 * interpolating linearly inside the bin the threshold falls in.
 */
export function referenceOf(
  metadata: ArtifactMetadata,
  confusion: readonly (readonly number[])[] | null,
  threshold: number,
  scores: readonly number[] | null = null,
): Reference {
  const total = metadata.metrics.evaluatedOn;
  const labels: Record<string, number> = {};
  metadata.labels.forEach((label, c) => {
    const predictedAs = confusion ? confusion.reduce((a, row) => a + (row[c] ?? 0), 0) : (metadata.metrics.perClass[label]?.support ?? 0);
    labels[label] = total > 0 ? predictedAs / total : 0;
  });
  const hist = metadata.metrics.confidence;
  let lowConfidence: number | null = null;
  const edge = threshold * CONFIDENCE_BINS;
  if (total > 0 && scores?.length === total) lowConfidence = scores.filter((s) => s < threshold).length / total;
  else if (hist && total > 0 && Math.abs(edge - Math.round(edge)) < 1e-9) lowConfidence = hist.slice(0, Math.round(edge)).reduce((a, n) => a + n, 0) / total;
  return { version: metadata.version, evaluatedOn: total, labels, lowConfidence };
}

/** The drift signals of one day against the reference, as sentences (empty: nothing to flag). */
export function driftOf(day: Omit<DaySummary, "drift">, reference: Reference | null): string[] {
  if (!reference || day.requests < MIN_REQUESTS) return [];
  const flags: string[] = [];
  const low = day.lowConfidence / day.requests;
  if (reference.lowConfidence !== null && low > 2 * reference.lowConfidence && low >= reference.lowConfidence + 0.1) {
    flags.push(`low-confidence answers ${pct(low)} (held-out: ${pct(reference.lowConfidence)})`);
  }
  const names = new Set([...Object.keys(reference.labels), ...Object.keys(day.labels)]);
  let worst = { label: "", distance: 0 };
  for (const label of names) {
    const distance = Math.abs((day.labels[label] ?? 0) / day.requests - (reference.labels[label] ?? 0));
    if (distance > worst.distance) worst = { label, distance };
  }
  if (worst.distance > LABEL_SHIFT_THRESHOLD) {
    const now = (day.labels[worst.label] ?? 0) / day.requests;
    flags.push(`label shift: ${worst.label} is ${pct(now)} of answers (held-out: ${pct(reference.labels[worst.label] ?? 0)})`);
  }
  return flags;
}

export function summarize(model: string, deltas: readonly Counters[], reference: Reference | null, threshold: number, now = new Date()): MonitorSummary {
  return {
    schemaVersion: 1,
    model,
    writtenAt: now.toISOString(),
    threshold,
    reference,
    days: sumByDay(deltas).map((d) => ({ ...d, drift: driftOf(d, reference) })),
  };
}

export function parseCounters(bytes: Uint8Array): Counters | null {
  const r = tryParseContractJson(countersSchema, bytes);
  return r.success ? r.data : null;
}

const pct = (x: number) => `${(x * 100).toFixed(1)} %`;
