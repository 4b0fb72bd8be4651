import { z } from "zod";
import { captureDayOf, isCaptureKey, keys } from "../keys.ts";
import { nameSchema, versionSchema } from "./common.ts";
import { labelSchema, newLabelSchema } from "./dataset.ts";
import { tryParseContractJson } from "./parse.ts";

/**
 * The traffic loop's contracts: what the edge captures, what a reviewer decides, what the edge counts.
 *
 *   models/<model>/capture.json                        capture settings (written by `edgetune capture`)
 *   captures/<model>/images/<day>/<id>.<ext>|.json     a captured input and its record
 *   captures/<model>/quota/<day>.json                  captures stored that day (compare-and-swap)
 *   captures/<model>/decisions/<id>.json               a reviewer's decision, applied by the job
 *   captures/<model>/counters/<day>/<stamp>.json       counter deltas flushed by edge isolates
 *   captures/<model>/monitor.json                      daily summary written by the nightly job
 *
 * Everything the edge writes is under `captures/` (its credentials may write nothing else); the settings
 * live beside the model, which the edge may read but not change.
 */

/** Capture settings of one model. Off unless a `capture.json` turns it on. */
export const captureConfigSchema = z.object({
  schemaVersion: z.literal(1).default(1),
  enabled: z.boolean().default(false),
  /**
   * Store an input when the top score is below this number (0 stores none for that reason; 1.01 stores
   * all). Unset: store the inputs the served version answers "unsure" (below their label's threshold,
   * shared/answer.ts), the same notion as classify's — see `captureRule`.
   */
  belowConfidence: z.number().min(0).max(1.01).optional(),
  /** And a random share of all other inputs (0–1), for an unbiased view of the traffic. */
  sampleRate: z.number().min(0).max(1).default(0),
  /** At most this many inputs per UTC day, all isolates together. */
  maxPerDay: z.number().int().min(0).max(1_000_000).default(500),
  /** At most this many bytes stored per UTC day. */
  maxBytesPerDay: z
    .number()
    .int()
    .min(0)
    .default(200 * 1024 * 1024),
  /** Inputs larger than this (either side) are resized to fit; every capture is a PNG encoded from the pixels. */
  maxSide: z.number().int().min(32).max(2048).default(512),
});
export type CaptureConfig = z.output<typeof captureConfigSchema>;
export const CAPTURE_OFF: CaptureConfig = captureConfigSchema.parse({});

/**
 * The number a top score is held to when the operator set none: by the monitor's low-confidence count
 * (its held-out reference is exact only for a number), and by capture for a version trained before
 * per-label thresholds (it has no "unsure"). Capture's default before thresholds existed.
 */
export const DEFAULT_BELOW = 0.5;

/** Which inputs capture stores for being unsure: the operator's number, else classify's own "unsure". */
export type CaptureRule = { kind: "below"; score: number } | { kind: "unsure" };
export const captureRule = (c: Pick<CaptureConfig, "belowConfidence">): CaptureRule =>
  c.belowConfidence === undefined ? { kind: "unsure" } : { kind: "below", score: c.belowConfidence };

/** The score under which an answer counts as low confidence for the monitor (the operator's number, else DEFAULT_BELOW). */
export const lowConfidenceThreshold = (c: Pick<CaptureConfig, "enabled" | "belowConfidence">) =>
  c.enabled ? (c.belowConfidence ?? DEFAULT_BELOW) : DEFAULT_BELOW;

export const CAPTURE_REASONS = ["low_confidence", "sampled"] as const;
export const captureIdSchema = z.string().regex(/^[0-9]{8}T[0-9]{6}-[0-9a-z]{8,16}$/, "must look like 20261129T101500-abcd1234");

/** The record stored beside a captured input. */
export const captureRecordSchema = z.object({
  schemaVersion: z.literal(1),
  id: captureIdSchema,
  model: nameSchema,
  version: versionSchema,
  capturedAt: z.iso.datetime(),
  reason: z.enum(CAPTURE_REASONS),
  /** The model's answer, best first (at most 5). */
  predictions: z
    .array(z.object({ label: labelSchema, score: z.number() }))
    .min(1)
    .max(5),
  image: z.object({
    key: z.string(),
    contentType: z.enum(["image/jpeg", "image/png", "image/webp", "image/gif"]),
    bytes: z.number().int().min(0),
    width: z.number().int().min(1),
    height: z.number().int().min(1),
    /** True when the stored copy was resized from a larger original. */
    resized: z.boolean(),
  }),
  /** Set by the job when a decision on this capture could not be applied: it is back in the review queue. */
  refused: z.object({ reason: z.string(), at: z.iso.datetime() }).optional(),
});
export type CaptureRecord = z.output<typeof captureRecordSchema>;

/**
 * A capture record of `model` read from the bucket, or null when it is not one: it must parse, name that
 * model, and point at its own image (`captures/<model>/images/<day>/<id>.<ext>`). A record crafted to
 * point elsewhere (another model's capture, a dataset image, a model file) is ignored: the review copies
 * and deletes what the record names.
 */
export function parseCaptureRecord(model: string, bytes: Uint8Array): CaptureRecord | null {
  const parsed = tryParseContractJson(captureRecordSchema, bytes);
  if (!parsed.success) return null;
  const r = parsed.data;
  const ext = r.image.contentType.split("/")[1];
  const own = r.model === model && r.image.key === keys.captureFile(model, captureDayOf(r.id), r.id, ext as string) && isCaptureKey(r.image.key);
  return own ? r : null;
}

/** A reviewer's decision on one capture: into the dataset under `label`, or discarded. */
export const captureDecisionSchema = z
  .object({
    schemaVersion: z.literal(1).default(1),
    id: captureIdSchema,
    action: z.enum(["accept", "discard"]),
    /** Required to accept: the true label (the predicted one, or a correction), a safe new label. */
    label: newLabelSchema.optional(),
    decidedAt: z.iso.datetime(),
    by: z.enum(["console", "cli"]),
    /** sha256 of the image the reviewer saw (the console's page hashes what it displayed; the CLI what it read): the job adds exactly those bytes, or nothing. */
    imageSha256: z
      .string()
      .regex(/^[0-9a-f]{64}$/)
      .optional(),
    /**
     * Console decisions: HMAC-SHA256 of `decisionMessage` keyed with the operator key that made it. The
     * job applies a stored decision only if it verifies with one of the operators' keys, so the edge's S3
     * credentials alone (which may write under captures/) cannot put images into a dataset.
     */
    signature: z
      .string()
      .regex(/^[0-9a-f]{64}$/)
      .optional(),
  })
  .refine((d) => d.action === "discard" || d.label !== undefined, { message: "an accepted capture needs its label", path: ["label"] });
export type CaptureDecision = z.output<typeof captureDecisionSchema>;

/** What a decision's signature covers: the model and every field that changes what the job does. */
export const decisionMessage = (model: string, d: Pick<CaptureDecision, "id" | "action" | "label" | "decidedAt" | "imageSha256">) =>
  ["edgetune-decision-v2", model, d.id, d.action, d.imageSha256 ?? "", d.decidedAt, d.label ?? ""].join("\n");

/** Captures stored on one UTC day: the edge's daily caps, shared by every isolate through a conditional write. */
export const captureQuotaSchema = z.object({ day: z.string(), count: z.number().int().min(0), bytes: z.number().int().min(0) });
export type CaptureQuota = z.output<typeof captureQuotaSchema>;

/** Top-1 confidence histogram bins: [0, 0.1), [0.1, 0.2), … [0.9, 1]. */
export const CONFIDENCE_BINS = 10;
export const confidenceBin = (score: number) => Math.min(CONFIDENCE_BINS - 1, Math.max(0, Math.floor(score * CONFIDENCE_BINS)));

/**
 * Counter files sit under captures/, which whoever holds the edge's key may write: every number read
 * from there is bounded before it is summed or held. A count is a safe non-negative integer; labels are
 * at most MAX_COUNTER_LABELS (a guard while parsing: the monitor also requires them to be the counting
 * version's own labels), named as dataset labels are; a delta (one isolate's minute) counts at most
 * MAX_DELTA_COUNT of anything (checked by the reader, `withinDeltaCaps`: a day's roll-up may hold more).
 */
export const MAX_COUNTER_LABELS = 10_000;
/** 2^40 answers in one isolate's flush interval is some 10^10 a second: no real delta comes near it. */
export const MAX_DELTA_COUNT = 2 ** 40;
const count = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);

/** What an isolate counted for one served version since its last flush (deltas: they add up). */
export const countersSchema = z.object({
  schemaVersion: z.literal(1),
  model: nameSchema,
  version: versionSchema,
  from: z.iso.datetime(),
  to: z.iso.datetime(),
  requests: count,
  /** Predicted (top-1) label → answers. */
  labels: z.record(labelSchema, count).refine((l) => Object.keys(l).length <= MAX_COUNTER_LABELS, `must name at most ${MAX_COUNTER_LABELS} labels`),
  confidence: z.array(count).length(CONFIDENCE_BINS),
  /** Answers whose top score was below the operator's capture number (DEFAULT_BELOW when none is set or capture is off). */
  lowConfidence: count,
  captured: count,
  /** Not stored because a daily cap was reached. */
  overCap: count,
  /** Not stored because the isolate was busy (classifications waiting for the decode slot, or captures on their way). */
  busy: count.default(0),
  /** Capture or counter writes that failed (the classification was not affected). */
  failed: count,
  optedOut: count,
});
export type Counters = z.output<typeof countersSchema>;

/** Counter deltas of one model and version made one: the widest span, every count added. */
export function mergeCounters(into: Counters, from: Counters): void {
  if (from.from < into.from) into.from = from.from; // ISO times: string order is time order
  if (from.to > into.to) into.to = from.to;
  addCounts(into, from);
}

/** All counts at zero. */
export const noCounts = (): CountFields => ({
  requests: 0,
  labels: {},
  confidence: new Array(CONFIDENCE_BINS).fill(0),
  lowConfidence: 0,
  captured: 0,
  overCap: 0,
  busy: 0,
  failed: 0,
  optedOut: 0,
});

/** The counts of `from` added into `into` (labels, histogram and every counter); shared by the edge's merge, roll-ups and daily sums. */
export type CountFields = Pick<Counters, "requests" | "labels" | "confidence" | "lowConfidence" | "captured" | "overCap" | "busy" | "failed" | "optedOut">;
export function addCounts(into: CountFields, from: CountFields): void {
  into.requests = add(into.requests, from.requests);
  for (const [label, n] of Object.entries(from.labels)) countLabel(into.labels, label, n);
  from.confidence.forEach((n, i) => {
    into.confidence[i] = add(into.confidence[i] ?? 0, n);
  });
  into.lowConfidence = add(into.lowConfidence, from.lowConfidence);
  into.captured = add(into.captured, from.captured);
  into.overCap = add(into.overCap, from.overCap);
  into.busy = add(into.busy, from.busy);
  into.failed = add(into.failed, from.failed);
  into.optedOut = add(into.optedOut, from.optedOut);
}

/** Adds `n` to a label's count; a label named "__proto__" is a count like any other, not the object's prototype. */
export function countLabel(labels: Record<string, number>, label: string, n: number): void {
  const value = add(Object.hasOwn(labels, label) ? (labels[label] as number) : 0, n);
  Object.defineProperty(labels, label, { value, enumerable: true, writable: true, configurable: true });
}

/** Sums saturate at the largest safe integer: a sum is always a readable count, however large its parts. */
const add = (a: number, b: number) => Math.min(Number.MAX_SAFE_INTEGER, a + b);

/** True when no count of a delta file exceeds what one isolate's flush interval can count (MAX_DELTA_COUNT). */
export function withinDeltaCaps(c: CountFields): boolean {
  const values = [c.requests, c.lowConfidence, c.captured, c.overCap, c.busy, c.failed, c.optedOut, ...c.confidence, ...Object.values(c.labels)];
  return values.every((v) => v <= MAX_DELTA_COUNT);
}
