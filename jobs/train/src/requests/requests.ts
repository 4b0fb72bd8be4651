import { readMetadata, readPointer } from "#shared/artifacts.ts";
import { listModels } from "#shared/catalog.ts";
import { manifestSchema } from "#shared/contracts/dataset.ts";
import { tryParseContractJson } from "#shared/contracts/parse.ts";
import {
  issuedAtOfId,
  MAX_REQUEST_AGE_MS,
  MAX_REQUEST_BYTES,
  MAX_REQUEST_SKEW_MS,
  type OperatorRequest,
  onnxExportSchema,
  operatorRequestSchema,
  outcomeMessage,
  type RequestOutcome,
  requestMessage,
  requestOfKey,
} from "#shared/contracts/request.ts";
import { EdgetuneError, NotFoundError, userMessage } from "#shared/errors.ts";
import { hmacSha256Hex, sha256Hex, signedWithAny } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import { PointerMovedError, rollback, ServedVersionChangedError, unknownModel } from "../catalog/catalog.ts";
import { onnxOf, readVersion } from "../export/export.ts";
import type { Logger } from "../log.ts";
import { OPSET } from "../model/onnx.ts";
import { applyDecisions, getCapped, operatorKeysFromEnv } from "../traffic/review.ts";

/**
 * The dispatcher's half of operator requests (shared/contracts/request.ts): the console's worker writes a
 * signed request under `captures/<model>/requests/`, which its S3 key may write; this applies it with the
 * dispatcher's rights, through the functions the CLI uses (`rollback`, `applyDecisions`, the export), so
 * the worker never gains a write outside `captures/`. A request is applied only if it verifies with an
 * operator's key, is fresh, and was never claimed before (a claim outside `captures/`, written first:
 * applied at most once); each gets an outcome the console reads back.
 */

/** A request that is not to be applied: refused with `message`, plainly (no signature, stale, unknown version…). */
export class RequestRefused extends EdgetuneError {
  constructor(message: string) {
    super("request_refused", message);
  }
}

export interface RequestDeps {
  log: Logger;
  /** The keys requests must be signed with (EDGETUNE_CONSOLE_KEYS by default, as for review decisions). */
  operatorKeys?: readonly string[];
  /** Starts a training run of `dataset` the way a push does (AWS: submits it to Batch; locally: the dispatcher queues it); a sentence saying what happened. */
  train: (dataset: string) => Promise<string>;
  /** Readies tfjs (initBackend by default): only once an export has passed its checks, so junk and forgeries cost no tfjs start. */
  loadTf?: () => Promise<unknown>;
  now?: () => Date;
}

const initBackendLazily = async () => (await import("../model/backend.ts")).initBackend();

/** At most this many requests per call (the rest wait for the next): a flood of forged files cannot hold the dispatcher. */
const MAX_REQUESTS_PER_RUN = 100;

/**
 * Applies every request waiting under `captures/<model>/requests/`, oldest first, and returns their
 * outcomes (also written to `captures/<model>/outcomes/<id>.json`). A file that is no request of this
 * model (too large, unreadable, misfiled) is deleted without an outcome: it is not the worker's.
 */
export async function applyRequests(store: ObjectStore, model: string, deps: RequestDeps): Promise<RequestOutcome[]> {
  const outcomes: RequestOutcome[] = [];
  const found: { key: string; size: number }[] = [];
  for await (const o of store.list(keys.captureRequests(model))) {
    found.push({ key: o.key, size: o.size });
    if (found.length >= MAX_REQUESTS_PER_RUN) break;
  }
  for (const { key, size } of found) {
    const named = requestOfKey(key);
    if (!named || named.model !== model) {
      deps.log.warn(`${key} is not named as a request of ${model}: deleted (the edge's S3 credentials may have leaked)`);
      await store.delete([key]);
      continue;
    }
    const request = size > MAX_REQUEST_BYTES ? null : await readRequest(store, model, key, named.id);
    if (!request) {
      // Named as the worker names a request, but not one: a request replaced (say, read and withheld to be
      // replayed later). Answered, so the console shows it instead of it vanishing; never over an outcome it had.
      const outcome = await signOutcome(model, replacedOutcome(named.id, (deps.now ?? (() => new Date()))()), deps);
      deps.log.warn(`${key}: ${outcome.message}`);
      await store.putIfAbsent(keys.captureOutcome(model, named.id), JSON.stringify(outcome), "application/json");
      await store.delete([key]);
      outcomes.push(outcome);
      continue;
    }
    const applied = await applyOne(store, request, deps);
    if (!applied) {
      // Another job claimed it moments ago and is applying it: its outcome is the one to show.
      deps.log.info(`request ${request.id} of ${model} is being applied by another dispatcher job: left to it`);
      continue;
    }
    const { replayed } = applied;
    const outcome = await signOutcome(model, applied.outcome, deps);
    outcomes.push(outcome);
    // The outcome first: a request deleted without one would look lost in the console. A replay's refusal
    // does not replace the outcome of the run that applied it (two dispatcher jobs started by one request).
    const body = JSON.stringify(outcome);
    if (replayed) await store.putIfAbsent(keys.captureOutcome(model, request.id), body, "application/json");
    else await store.put(keys.captureOutcome(model, request.id), body, "application/json");
    await store.delete([key]);
    deps.log.info(`request ${request.id} (${request.kind}${request.version ? ` ${request.version}` : ""}) of ${model}: ${outcome.state}: ${outcome.message}`);
  }
  return outcomes;
}

/**
 * Models with a request waiting, for the nightly sweep: a request whose trigger was lost (its event in
 * the dead-letter queue, or `npm start` stopped) is answered then — most likely refused for its age —
 * instead of showing "waiting" in the console for ever.
 */
export async function modelsWithRequests(store: ObjectStore): Promise<string[]> {
  const found: string[] = [];
  for (const model of await listModels(store)) {
    // Up to the first key named as a request: junk sorting first (say `!.json`) must not hide the real ones.
    let seen = 0;
    for await (const o of store.list(keys.captureRequests(model))) {
      if (requestOfKey(o.key)) {
        found.push(model);
        break;
      }
      if (++seen >= SWEEP_LOOKAHEAD) {
        // As many non-requests as a run applies: one run clears them (it deletes what is not a request).
        found.push(model);
        break;
      }
    }
  }
  return found;
}

/** Keys looked at per model by the nightly sweep before it runs that model's requests anyway. */
const SWEEP_LOOKAHEAD = MAX_REQUESTS_PER_RUN;

/**
 * Signed with an operator key (the first unscoped one: the worker verifies with those), so the worker can
 * tell it from an outcome the edge's key wrote. Without operator keys it stays unsigned (shown unverified).
 */
async function signOutcome(model: string, outcome: RequestOutcome, deps: RequestDeps): Promise<RequestOutcome> {
  const key = (deps.operatorKeys ?? operatorKeysFromEnv()).find((k) => !k.includes(":"));
  return key ? { ...outcome, signature: await hmacSha256Hex(key, outcomeMessage(model, outcome)) } : outcome;
}

async function readRequest(store: ObjectStore, model: string, key: string, id: string): Promise<OperatorRequest | null> {
  const bytes = await getCapped(store, key, MAX_REQUEST_BYTES);
  const parsed = bytes === null ? null : tryParseContractJson(operatorRequestSchema, bytes);
  return parsed?.success && parsed.data.id === id && parsed.data.model === model ? parsed.data : null;
}

const replacedOutcome = (id: string, now: Date): RequestOutcome => ({
  schemaVersion: 1,
  id,
  issuedAt: issuedAtOfId(id),
  state: "refused",
  message:
    "The request file was replaced by something that is not a request (the edge's S3 credentials may have leaked): nothing was done. Ask again if it is still wanted.",
  at: now.toISOString(),
});

/**
 * One request checked (signature, age, claim) and applied; never throws: what went wrong is its outcome.
 * Null when another job holds a fresh claim on it and has not answered yet: that job's outcome is the one.
 */
async function applyOne(store: ObjectStore, request: OperatorRequest, deps: RequestDeps): Promise<{ outcome: RequestOutcome; replayed: boolean } | null> {
  const outcome = await checkAndPerform(store, request, deps);
  if (outcome === IN_PROGRESS) return null;
  return { outcome, replayed: outcome.state === "refused" && (outcome.message === APPLIED_BEFORE || outcome.provisional === true) };
}

const APPLIED_BEFORE = "It was applied before (a request is applied once); ask again to repeat it.";
const IN_PROGRESS = Symbol("in progress");
/**
 * A claim younger than this without an outcome belongs to a job still applying it: two dispatcher jobs
 * started within a Fargate start-up, or Batch retrying one. Longer than any request takes (an export is
 * well under a minute), short enough that one whose job died is answered by the next job or the nightly sweep.
 */
export const CLAIM_IN_PROGRESS_MS = 15 * 60 * 1000;

/** When the request's claim was written (requests/, the dispatcher's own), or null if unreadable. */
async function claimedAt(store: ObjectStore, request: OperatorRequest): Promise<number | null> {
  const bytes = await store.get(keys.requestApplied(request.model, request.id));
  try {
    const at = Date.parse((JSON.parse(new TextDecoder().decode(bytes ?? new Uint8Array())) as { appliedAt?: string }).appliedAt ?? "");
    return Number.isNaN(at) ? null : at;
  } catch {
    return null;
  }
}

async function checkAndPerform(store: ObjectStore, request: OperatorRequest, deps: RequestDeps): Promise<RequestOutcome | typeof IN_PROGRESS> {
  const now = (deps.now ?? (() => new Date()))();
  const outcome = (state: RequestOutcome["state"], message: string): RequestOutcome => ({
    schemaVersion: 1,
    id: request.id,
    kind: request.kind,
    ...(request.version ? { version: request.version } : {}),
    issuedAt: request.issuedAt,
    state,
    message,
    at: now.toISOString(),
  });
  // Written with the worker's S3 key alone, or signed with a key that is no longer an operator's.
  if (!(await signedWithAny(request.signature, requestMessage(request), deps.operatorKeys ?? operatorKeysFromEnv()))) {
    // Not the worker's doing (it signs every request with the asking operator's key): someone wrote under captures/.
    deps.log.warn(
      `request ${request.id} of ${request.model} is not signed by a current operator key: possibly forged (the edge's S3 credentials may have leaked)`,
    );
    return outcome(
      "refused",
      "It is not signed by a current operator key (CONSOLE_API_KEYS): possibly forged (the edge's S3 credentials may have leaked), or signed with a key since removed. Nothing was done; ask again from the console if you asked for it.",
    );
  }
  const age = now.getTime() - Date.parse(request.issuedAt);
  if (age > MAX_REQUEST_AGE_MS)
    return outcome(
      "refused",
      `It was made ${Math.round(age / 60_000)} minutes ago, longer than the ${MAX_REQUEST_AGE_MS / 60_000} minutes a request stays valid: ask again if it is still wanted.`,
    );
  if (-age > MAX_REQUEST_SKEW_MS) return outcome("refused", "Its time is in the future (the worker's clock, or a forged request): ask again.");
  // The claim, where the worker's key cannot write: a signed request copied back under captures/ finds it.
  if (
    !(await store.putIfAbsent(keys.requestApplied(request.model, request.id), JSON.stringify({ ...request, appliedAt: now.toISOString() }), "application/json"))
  ) {
    // Claimed before: answered already (a replay), being applied by another job right now, or claimed by
    // a job that stopped before answering. Only the first is surely "applied before".
    if (await store.head(keys.captureOutcome(request.model, request.id))) return outcome("refused", APPLIED_BEFORE);
    const at = await claimedAt(store, request);
    if (at !== null && now.getTime() - at < CLAIM_IN_PROGRESS_MS) return IN_PROGRESS;
    return {
      ...outcome(
        "refused",
        `A dispatcher job took it ${at === null ? "earlier" : `${Math.round((now.getTime() - at) / 60_000)} minutes ago`} and left no outcome (stopped, or still running): it may or may not have been applied. Check the model's served version before asking again.`,
      ),
      provisional: true,
    };
  }
  try {
    return outcome("done", await perform(store, request, deps));
  } catch (e) {
    // Whatever the CLI would have refused (unknown version, no earlier version, another dataset's model) is
    // "refused"; anything else (storage, a conversion failing) "failed". Both in the CLI's words.
    const refused = e instanceof RequestRefused || e instanceof NotFoundError;
    // The cause in the job's log (not in the outcome, which the console shows): what a bug report needs.
    if (!refused)
      deps.log.warn(`request ${request.id} of ${request.model} failed: ${userMessage(e)}`, { error: e instanceof Error ? (e.stack ?? e.message) : String(e) });
    return outcome(refused ? "refused" : "failed", userMessage(e));
  }
}

async function perform(store: ObjectStore, request: OperatorRequest, deps: RequestDeps): Promise<string> {
  const { model } = request;
  switch (request.kind) {
    case "rollback":
    case "promote": {
      // `edgetune rollback [--to]`: the same compare-and-swap on the pointer, the same lock rules.
      // Only from the pointer the operator saw (signed `from`, and a rollback's `to`): a withheld request
      // written back later finds it moved and is refused.
      const expected = { from: request.from as string, promotedAt: request.fromPromotedAt as string, ...(request.to ? { target: request.to } : {}) };
      const { pointer, changed, duringRun } = await rollback(store, model, request.version, expected).catch((e: unknown) => {
        if (e instanceof ServedVersionChangedError) throw new RequestRefused(e.message);
        if (e instanceof PointerMovedError)
          throw new EdgetuneError(e.code, "The served version changed while this was written; nothing was changed. Ask again.");
        throw e;
      });
      if (!changed) return `${model} already serves ${pointer.version}; nothing changed.`;
      return `${model} now serves ${pointer.version} (was ${pointer.previous}); the edge picks it up within its POINTER_TTL_SECONDS.${duringRun ? " A training run in progress will not undo this (it ends not promoted)." : ""}`;
    }
    case "train":
      return deps.train(await ownDataset(store, model));
    case "apply-reviewed": {
      const r = await applyDecisions(store, model, deps.log, { operatorKeys: deps.operatorKeys ?? operatorKeysFromEnv() });
      const dataset = r.accepted[0]?.key.split("/")[1];
      const parts = [`${r.accepted.length} added to the dataset`, `${r.discarded.length} discarded`];
      if (r.refused.length) parts.push(`${r.refused.length} refused (back in the review queue with the reason)`);
      if (r.unverified.length) parts.push(`${r.unverified.length} not signed by a current operator key`);
      return `${parts.join(", ")}.${dataset ? ` Train now to use the added images (dataset ${dataset}).` : ""}`;
    }
    case "export-onnx":
      return exportOnnx(store, model, request.version as string, deps.loadTf ?? initBackendLazily);
  }
}

/**
 * The dataset a "train now" trains: the one that owns the model (the pointer's, else the served version's),
 * if its runs still train into this model. A dataset whose manifest now names another model would train
 * that one: refused, with the CLI command that does it on purpose.
 */
async function ownDataset(store: ObjectStore, model: string): Promise<string> {
  const pointer = await readPointer(store, model);
  if (!pointer) throw await unknownModel(store, model, "has no served version (train it with edgetune train)");
  const dataset = pointer.dataset ?? (await readMetadata(store, model, pointer.version, pointer.metadataSha256)).dataset.name;
  const manifest = await store.get(keys.manifest(dataset));
  if (!manifest) throw new RequestRefused(`Dataset ${dataset}, which ${model} belongs to, has no manifest.json (gone, or being uploaded): push it again.`);
  const parsed = tryParseContractJson(manifestSchema, manifest);
  const trains = (parsed.success ? parsed.data.model : undefined) ?? dataset;
  if (trains !== model)
    throw new RequestRefused(
      `Model ${model} belongs to dataset ${dataset}, whose runs now train model ${trains} (its manifest's "model"): train ${model} on purpose with edgetune train --dataset ${dataset} --model ${model}.`,
    );
  return dataset;
}

/** `edgetune export --format onnx`, stored beside the version: the file, then its description (last: the console's "exists"). */
async function exportOnnx(store: ObjectStore, model: string, version: string, loadTf: () => Promise<unknown>): Promise<string> {
  const started = performance.now();
  const files = await readVersion(store, model, version); // an unknown version is refused before tfjs starts
  await loadTf();
  const bytes = await onnxOf(files);
  await store.put(keys.versionOnnx(model, version), bytes, "application/octet-stream");
  const info = onnxExportSchema.parse({
    model,
    version,
    bytes: bytes.byteLength,
    sha256: await sha256Hex(bytes),
    opset: OPSET,
    createdAt: new Date().toISOString(),
  });
  await store.put(keys.versionOnnxInfo(model, version), JSON.stringify(info), "application/json");
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  return `${model} ${version} exported as ONNX (opset ${OPSET}, ${(bytes.byteLength / 1e6).toFixed(1)} MB, ${seconds} s): download it from the version's row.`;
}
