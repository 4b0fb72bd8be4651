import { z } from "zod";
import { nameSchema, sha256Schema, versionSchema } from "./common.ts";

/**
 * Operator requests: what the console asks the dispatcher to do, since the worker itself may write only
 * under `captures/` (issue #30). Signed like a review decision (contracts/capture.ts), applied once.
 *
 *   captures/<model>/requests/<id>.json   a request, written by the worker for an operator key (its creation
 *                                         starts the dispatcher in AWS; locally the dispatcher polls for it)
 *   captures/<model>/outcomes/<id>.json   what became of it, written by the dispatcher (the console reads it;
 *                                         another folder, so writing it starts nothing)
 *   requests/<model>/<id>.json            the dispatcher's claim, outside captures/: applied at most once
 *
 * Kinds: `rollback` (serve the version served before, as `edgetune rollback`), `promote` (serve `version`,
 * as `edgetune rollback --to`), `train` (train the model's dataset now, as a push would), `apply-reviewed`
 * (apply the console's review decisions now, as the nightly run does) and `export-onnx` (store `version`
 * as one ONNX file the console can download, as `edgetune export` makes it).
 */
export const REQUEST_KINDS = ["rollback", "promote", "train", "apply-reviewed", "export-onnx"] as const;
export type RequestKind = (typeof REQUEST_KINDS)[number];
/** Kinds that act on one version (the others on the model). */
export const VERSION_KINDS: readonly RequestKind[] = ["promote", "export-onnx"];
/** Kinds that move the pointer: applied only while it still serves the version it served when asked. */
export const POINTER_KINDS: readonly RequestKind[] = ["rollback", "promote"];

/** Ids sort by time (the worker makes them from the issue time), so a listing is oldest first. */
export const requestIdSchema = z.string().regex(/^[0-9]{8}T[0-9]{6}-[0-9a-f]{8,16}$/, "must look like 20261206T051500-abcd1234");

/**
 * A request older than this when the dispatcher reads it is refused: it was meant for then (a rollback
 * an hour late may undo a newer decision), and a copy replayed later is dead. Long enough for the cloud
 * path (EventBridge → a Fargate job starting, a few minutes) with margin; a clock ahead by more than
 * MAX_REQUEST_SKEW_MS is refused too.
 */
export const MAX_REQUEST_AGE_MS = 30 * 60 * 1000;
export const MAX_REQUEST_SKEW_MS = 2 * 60 * 1000;
/** A request the worker writes is under 1 KB; anything far larger under requests/ is not the worker's. */
export const MAX_REQUEST_BYTES = 4 * 1024;
export const MAX_OUTCOME_BYTES = 8 * 1024;

export const operatorRequestSchema = z
  .object({
    schemaVersion: z.literal(1).default(1),
    id: requestIdSchema,
    model: nameSchema,
    kind: z.enum(REQUEST_KINDS),
    /** Required by `promote` and `export-onnx`; absent otherwise. */
    version: versionSchema.optional(),
    /**
     * `rollback` and `promote`: the version served when the operator asked (the worker reads the pointer).
     * Signed, so a request withheld and written back later, after the served version moved, is refused
     * instead of moving it again (a second step back, or undoing a newer decision).
     */
    from: versionSchema.optional(),
    /** With `from`: that pointer's promotedAt, so a pointer moved away and back (v1 → v2 → v1) is not taken for the one asked against. */
    fromPromotedAt: z.iso.datetime().optional(),
    /** `rollback`: the version it goes back to (the pointer's history[0] when asked); signed for the same reason. */
    to: versionSchema.optional(),
    issuedAt: z.iso.datetime(),
    by: z.literal("console"),
    /** HMAC-SHA256 of `requestMessage` keyed with the operator key that asked (as a console decision is signed). */
    signature: sha256Schema,
  })
  .refine((r) => VERSION_KINDS.includes(r.kind) === (r.version !== undefined), {
    message: "promote and export-onnx name a version; the other kinds do not",
    path: ["version"],
  })
  .refine((r) => POINTER_KINDS.includes(r.kind) === (r.from !== undefined) && (r.from !== undefined) === (r.fromPromotedAt !== undefined), {
    message: "rollback and promote name the version served when asked; the other kinds do not",
    path: ["from"],
  })
  .refine((r) => (r.kind === "rollback") === (r.to !== undefined), { message: "rollback names the version it goes back to", path: ["to"] });
export type OperatorRequest = z.output<typeof operatorRequestSchema>;

/** What a request's signature covers: every field that changes what the dispatcher does (v2: with `from` and `to`). */
export const requestMessage = (r: Pick<OperatorRequest, "id" | "model" | "kind" | "version" | "from" | "fromPromotedAt" | "to" | "issuedAt">) =>
  ["edgetune-request-v2", r.model, r.id, r.kind, r.version ?? "", r.from ?? "", r.fromPromotedAt ?? "", r.to ?? "", r.issuedAt].join("\n");

export const REQUEST_STATES = ["done", "refused", "failed"] as const;

/**
 * What the dispatcher made of a request: done (with what it did), refused (it was not valid: a bad
 * signature, stale, replayed, an unknown version…) or failed (valid, but applying it failed). `message`
 * is one plain sentence for the console. It sits under captures/, so the worker's key could forge one:
 * it is shown, never acted on, and the worker flags one without a valid `signature`.
 */
export const requestOutcomeSchema = z.object({
  schemaVersion: z.literal(1).default(1),
  id: requestIdSchema,
  /** Absent when the request file could not be read (replaced by something else): its kind is unknown. */
  kind: z.enum(REQUEST_KINDS).optional(),
  version: versionSchema.optional(),
  issuedAt: z.iso.datetime(),
  state: z.enum(REQUEST_STATES),
  message: z.string().max(2000),
  at: z.iso.datetime(),
  /**
   * Set on a refusal that may be replaced: the request was claimed by a job that left no outcome yet (it
   * may still finish and write its own). The console keeps polling instead of taking it as the answer.
   */
  provisional: z.literal(true).optional(),
  /**
   * HMAC-SHA256 of `outcomeMessage` with an operator key (the dispatcher holds them, the edge's S3 key
   * does not): the worker shows an outcome that does not verify as unverified, and keeps its request pending.
   */
  signature: sha256Schema.optional(),
});
export type RequestOutcome = z.output<typeof requestOutcomeSchema>;

/** What an outcome's signature covers: everything the console shows of it, for its model (own prefix: never a request's). */
export const outcomeMessage = (model: string, o: Omit<RequestOutcome, "signature" | "schemaVersion">) =>
  ["edgetune-outcome-v1", model, o.id, o.kind ?? "", o.version ?? "", o.issuedAt, o.state, o.message, o.at, o.provisional ? "provisional" : ""].join("\n");

/** A version's ONNX export, stored beside its model files by an `export-onnx` request. */
export const onnxExportSchema = z.object({
  schemaVersion: z.literal(1).default(1),
  model: nameSchema,
  version: versionSchema,
  bytes: z.number().int().min(1),
  sha256: sha256Schema,
  opset: z.number().int(),
  createdAt: z.iso.datetime(),
});
export type OnnxExport = z.output<typeof onnxExportSchema>;

/** The time a request id was made from (ids are `<UTC yyyymmddThhmmss>-<random>`), as an ISO date. */
export function issuedAtOfId(id: string): string {
  const d = id.slice(0, 15);
  return `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6, 8)}T${d.slice(9, 11)}:${d.slice(11, 13)}:${d.slice(13, 15)}.000Z`;
}

/** `captures/<model>/requests/<id>.json` → { model, id }, else null (outcomes and other files are not requests). */
export function requestOfKey(key: string): { model: string; id: string } | null {
  const m = /^captures\/([^/]+)\/requests\/([^/]+)\.json$/.exec(key);
  if (!m || !nameSchema.safeParse(m[1]).success || !requestIdSchema.safeParse(m[2]).success) return null;
  return { model: m[1] as string, id: m[2] as string };
}
