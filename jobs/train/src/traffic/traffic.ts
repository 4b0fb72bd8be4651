import { timingSafeEqual } from "node:crypto";
import { readMetadata, readPointer, readVerifiedFile } from "../../../../shared/artifacts.ts";
import { ARTIFACT_FILES, type ArtifactMetadata } from "../../../../shared/contracts/artifact.ts";
import {
  CAPTURE_OFF,
  type CaptureConfig,
  type CaptureDecision,
  type CaptureRecord,
  type Counters,
  captureConfigSchema,
  captureDecisionSchema,
  captureIdSchema,
  decisionMessage,
  mergeCounters,
  parseCaptureRecord,
} from "../../../../shared/contracts/capture.ts";
import { classifyDatasetKeys } from "../../../../shared/contracts/dataset.ts";
import { parseContract, tryParseContractJson } from "../../../../shared/contracts/parse.ts";
import { DatasetError, InvalidOptionError, NotFoundError, userMessage } from "../../../../shared/errors.ts";
import { hmacSha256Hex, sha256Hex } from "../../../../shared/hash.ts";
import { keys } from "../../../../shared/keys.ts";
import { type MonitorSummary, parseCounters, referenceOf, summarize } from "../../../../shared/monitor.ts";
import { getText, type ObjectStore } from "../../../../shared/s3/store.ts";
import { decodeImage } from "../dataset/decode.ts";
import type { Logger } from "../log.ts";

/**
 * The job's half of the traffic loop (shared/contracts/capture.ts): capture settings, the review queue,
 * decisions applied to the dataset, and the daily monitoring summary. The edge only ever adds files under
 * `captures/`; moving an accepted image into `datasets/` and cleaning up happens here, with the job's
 * rights and the same checks an upload gets.
 */

export async function readCaptureConfig(store: ObjectStore, model: string): Promise<CaptureConfig> {
  const text = await getText(store, keys.captureConfig(model));
  return text === null ? CAPTURE_OFF : parseContract(captureConfigSchema, JSON.parse(text), `capture settings of ${model}`);
}

/** Turns capture on or off for a model, or changes its settings (checked; the edge picks them up within its TTL). */
export async function writeCaptureConfig(store: ObjectStore, model: string, changes: Partial<CaptureConfig>): Promise<CaptureConfig> {
  if (!(await readPointer(store, model))) throw new NotFoundError(`Model ${model} has no served version: capture applies to a served model.`);
  const config = parseContract(captureConfigSchema, { ...(await readCaptureConfig(store, model)), ...changes }, "capture settings");
  await store.put(keys.captureConfig(model), `${JSON.stringify(config, null, 2)}\n`, "application/json");
  return config;
}

export interface PendingCapture extends CaptureRecord {
  decision: CaptureDecision | null;
}

/** Every capture of `model` not applied yet, oldest first, with its decision if one was recorded. */
export async function listCaptures(store: ObjectStore, model: string): Promise<PendingCapture[]> {
  const decisions = new Map<string, CaptureDecision>();
  for await (const o of store.list(keys.captureDecisions(model))) {
    const bytes = await store.get(o.key);
    const parsed = bytes === null ? null : tryParseContractJson(captureDecisionSchema, bytes);
    // A decision counts under the name it is filed as (that key is what is deleted once it is applied).
    if (parsed?.success && o.key === keys.captureDecision(model, parsed.data.id)) decisions.set(parsed.data.id, parsed.data);
  }
  const out: PendingCapture[] = [];
  for await (const o of store.list(keys.captureImages(model))) {
    if (!o.key.endsWith(".json")) continue;
    const bytes = await store.get(o.key);
    const record = bytes ? parseCaptureRecord(model, bytes) : null;
    // A record must sit where its id says (the review deletes that key after applying it).
    if (record && o.key === keys.captureRecord(model, record.id)) {
      out.push({ ...record, decision: decisions.get(record.id) ?? null });
    }
  }
  return out;
}

/** Records a decision (the CLI's; the console records its own through the worker). */
export async function decide(store: ObjectStore, model: string, id: string, action: "accept" | "discard", label?: string): Promise<CaptureDecision> {
  const bytes = captureIdSchema.safeParse(id).success ? await store.get(keys.captureRecord(model, id)) : null;
  const pending = bytes ? parseCaptureRecord(model, bytes) : null;
  if (!pending || pending.id !== id) throw new NotFoundError(`Model ${model} has no capture ${id} waiting for review (see edgetune review ${model}).`);
  const decision = parseContract(
    captureDecisionSchema,
    { id, action, label: action === "accept" ? (label ?? pending.predictions[0]?.label) : undefined, decidedAt: new Date().toISOString(), by: "cli" },
    "decision",
  );
  await store.put(keys.captureDecision(model, id), JSON.stringify(decision), "application/json");
  return decision;
}

export interface ApplyResult {
  accepted: { id: string; key: string }[];
  discarded: string[];
  refused: { id: string; reason: string }[];
  /** Decisions not signed by a current operator key: not applied, sent back to the review queue. */
  unverified: string[];
}

/** The operators' console keys, which console decisions must be signed with (EDGETUNE_CONSOLE_KEYS; in AWS from Secrets Manager). */
export function operatorKeysFromEnv(env: NodeJS.ProcessEnv = process.env): string[] {
  return (env.EDGETUNE_CONSOLE_KEYS ?? "")
    .split(",")
    .map((k) => k.trim())
    .filter(Boolean);
}

/** True when the decision's signature was made with one of `operatorKeys` (see contracts/capture.ts; the worker signs with the same `hmacSha256Hex`). */
export async function signedByOperator(model: string, decision: CaptureDecision, operatorKeys: readonly string[]): Promise<boolean> {
  if (!decision.signature) return false;
  const presented = Buffer.from(decision.signature, "hex");
  let ok = false;
  for (const k of operatorKeys) {
    const expected = Buffer.from(await hmacSha256Hex(k, decisionMessage(model, decision)), "hex");
    if (expected.length === presented.length && timingSafeEqual(expected, presented)) ok = true;
  }
  return ok;
}

/**
 * Applies every recorded decision of `model`: an accepted capture is checked as an upload is (a label the
 * dataset has, an image the job decodes) and copied into the served version's dataset as
 * `<label>/captured-<id>.<ext>` (under `train/` in a dataset with splits), its provenance in the object's
 * metadata; then the capture, its image and its decision are deleted. Discards are deleted. A refused
 * accept goes back to the review queue with the reason (in its record), its decision removed. The
 * dataset's manifest is not rewritten: the next nightly run sees the new images (its version fingerprint
 * covers the listing) and trains on them.
 *
 * Only decisions the caller made itself (`trusted`: the CLI's, in this process) or signed with an
 * operator's key (the console's) are applied: anything else under decisions/ could have been written with
 * the edge's S3 credentials, which may write there.
 */
export async function applyDecisions(
  store: ObjectStore,
  model: string,
  log: Logger,
  options: { operatorKeys?: readonly string[]; trusted?: ReadonlySet<string> } = {},
): Promise<ApplyResult> {
  const result: ApplyResult = { accepted: [], discarded: [], refused: [], unverified: [] };
  const operatorKeys = options.operatorKeys ?? operatorKeysFromEnv();
  /** Back to the review queue, saying why, its decision removed. */
  const sendBack = async (capture: PendingCapture, reason: string) => {
    const { decision: _, ...record } = capture;
    await store.put(
      keys.captureRecord(model, capture.id),
      JSON.stringify({ ...record, refused: { reason, at: new Date().toISOString() } }),
      "application/json",
    );
    await store.delete([keys.captureDecision(model, capture.id)]);
  };
  const decided: PendingCapture[] = [];
  for (const c of await listCaptures(store, model)) {
    if (!c.decision) continue;
    const trusted = options.trusted?.has(c.id) === true;
    if (trusted || (c.decision.imageSha256 && (await signedByOperator(model, c.decision, operatorKeys)))) {
      decided.push(c);
      continue;
    }
    // Written with S3 access alone, or signed with a key that is no longer an operator's: not applied.
    result.unverified.push(c.id);
    log.warn(`the decision on capture ${c.id} of ${model} is not signed by an operator key (CONSOLE_API_KEYS): not applied, back in the queue`);
    await sendBack(c, "the decision was not signed by a current operator key; decide again").catch((e) => log.warn(`capture ${c.id}: ${userMessage(e)}`));
  }
  if (decided.length === 0) return result;
  const served = await servedMetadata(store, model);
  const dataset = served.dataset.name;
  const layout = await datasetLayout(store, dataset);
  for (const capture of decided) {
    const decision = capture.decision as CaptureDecision;
    const captureKeys = [capture.image.key, keys.captureRecord(model, capture.id), keys.captureDecision(model, capture.id)];
    const cleanUp = () =>
      store.delete(captureKeys).catch((e) => log.warn(`capture ${capture.id}: applied, but not cleaned up (${userMessage(e)}); the lifecycle rule will`));
    if (decision.action === "discard") {
      await cleanUp();
      result.discarded.push(capture.id);
      continue;
    }
    let key: string;
    try {
      const label = decision.label as string;
      if (!layout.labels.has(label)) {
        throw new DatasetError(
          `label ${label} is not one of dataset ${dataset}'s labels (${[...layout.labels].sort().join(", ")}); push new labels with edgetune push`,
        );
      }
      const bytes = await store.get(capture.image.key);
      if (!bytes) throw new NotFoundError(`its image ${capture.image.key} is gone (expired?)`);
      if (decision.imageSha256 && (await sha256Hex(bytes)) !== decision.imageSha256) {
        throw new DatasetError("its image changed after it was reviewed; review it again");
      }
      await decodeImage(bytes);
      const ext = capture.image.contentType.split("/")[1] === "jpeg" ? "jpg" : (capture.image.contentType.split("/")[1] as string);
      key = `${keys.dataset(dataset)}${layout.split ? "train/" : ""}${label}/captured-${capture.id}.${ext}`;
      // A decision applied before (and replayed) adds nothing: one capture, one dataset image.
      if (!(await store.head(key))) {
        await store.put(key, bytes, capture.image.contentType, {
          "edgetune-captured-from": `${model}@${capture.version}`,
          "edgetune-captured-at": capture.capturedAt,
          "edgetune-predicted": `${capture.predictions[0]?.label}:${capture.predictions[0]?.score.toFixed(4)}`,
          "edgetune-reviewed": `${decision.by} ${decision.decidedAt}`,
        });
      }
    } catch (e) {
      result.refused.push({ id: capture.id, reason: userMessage(e) });
      log.warn(`capture ${capture.id} of ${model} was not added: ${userMessage(e)}`);
      await sendBack(capture, userMessage(e)).catch((err) => log.warn(`capture ${capture.id}: ${userMessage(err)}`));
      continue;
    }
    // In the dataset now: a failed clean-up does not undo that.
    await cleanUp();
    result.accepted.push({ id: capture.id, key });
    log.info(`capture ${capture.id} of ${model} added to dataset ${dataset} as ${decision.label}`);
  }
  return result;
}

async function servedMetadata(store: ObjectStore, model: string): Promise<ArtifactMetadata> {
  const pointer = await readPointer(store, model);
  if (!pointer) throw new NotFoundError(`Model ${model} has no served version.`);
  return readMetadata(store, model, pointer.version);
}

async function datasetLayout(store: ObjectStore, dataset: string): Promise<{ split: boolean; labels: Set<string> }> {
  const rel: string[] = [];
  for await (const o of store.list(keys.dataset(dataset))) rel.push(o.key.slice(keys.dataset(dataset).length));
  if (rel.length === 0) throw new NotFoundError(`Dataset ${dataset} is gone: accepted captures have nowhere to go.`);
  const { layout, entries } = classifyDatasetKeys(rel);
  return { split: layout === "split", labels: new Set(entries.flatMap((e) => (e.kind === "image" ? [e.label] : []))) };
}

/** Counter deltas older than this many days are rolled up into one file per day by the nightly job. */
const KEEP_DELTAS_DAYS = 1;

/**
 * Adds up the edge's counter deltas of the last `days` days and compares them with the served version's
 * held-out split. Past days' deltas are rolled up into one file per day as they are read (`rollUp`), so
 * the file count stays one per day however many isolates flushed.
 */
export async function monitor(store: ObjectStore, model: string, options: { days?: number; rollUp?: boolean; now?: Date } = {}): Promise<MonitorSummary> {
  const now = options.now ?? new Date();
  const since = new Date(now.getTime() - ((options.days ?? 30) - 1) * 86_400_000).toISOString().slice(0, 10);
  const byDay = new Map<string, { key: string; counters: Counters; covers: string[] }[]>();
  for await (const o of store.list(keys.captureCounters(model))) {
    const day = o.key.slice(keys.captureCounters(model).length, keys.captureCounters(model).length + 10);
    if (day < since) continue;
    const bytes = await store.get(o.key);
    const counters = bytes ? parseCounters(bytes) : null;
    if (!bytes || !counters) continue;
    // A roll-up names the deltas it adds up: if deleting them failed, they are not counted twice.
    const covers = o.key.includes("/rollup-") ? ((JSON.parse(new TextDecoder().decode(bytes)) as { covers?: string[] }).covers ?? []) : [];
    byDay.set(day, [...(byDay.get(day) ?? []), { key: o.key, counters, covers }]);
  }
  const deltas: Counters[] = [];
  const cutoff = new Date(now.getTime() - KEEP_DELTAS_DAYS * 86_400_000).toISOString().slice(0, 10);
  for (const [day, all] of byDay) {
    const covered = new Set(all.flatMap((f) => f.covers));
    const files = all.filter((f) => !covered.has(f.key));
    deltas.push(...files.map((f) => f.counters));
    const loose = files.filter((f) => !f.key.includes("/rollup-"));
    if (!options.rollUp || day >= cutoff || loose.length === 0) continue;
    // One file per version and day (the earlier roll-up included), written before the deltas it replaces are deleted.
    const versions = new Map<string, typeof files>();
    for (const f of files) versions.set(f.counters.version, [...(versions.get(f.counters.version) ?? []), f]);
    const sums = [...versions].map(([version, list]) => ({ version, list, sum: sumCounters(list.map((f) => f.counters)) }));
    for (const { version, list, sum } of sums) {
      const covers = [...list.flatMap((f) => f.covers), ...list.filter((f) => !f.key.includes("/rollup-")).map((f) => f.key)];
      await store.put(keys.captureCounterFile(model, day, `rollup-${version}`), JSON.stringify({ ...sum, covers }), "application/json");
    }
    await store.delete([...loose.map((f) => f.key), ...all.filter((f) => covered.has(f.key)).map((f) => f.key)]);
    // Deleted: the roll-ups need not name them any more (they would grow by every delta of the day).
    for (const { version, sum } of sums) {
      await store.put(keys.captureCounterFile(model, day, `rollup-${version}`), JSON.stringify(sum), "application/json");
    }
  }
  let reference = null;
  let threshold = CAPTURE_OFF.belowConfidence;
  try {
    const served = await servedMetadata(store, model);
    const config = await readCaptureConfig(store, model);
    threshold = config.enabled ? config.belowConfidence : CAPTURE_OFF.belowConfidence;
    // The confusion matrix gives the held-out predicted-label shares; without a readable report, the
    // true-label shares (per-class support) stand in.
    const confusion = await readVerifiedFile(store, served, ARTIFACT_FILES.report)
      .then((bytes) => (JSON.parse(new TextDecoder().decode(bytes)) as { confusion?: number[][] }).confusion ?? null)
      .catch(() => null);
    reference = referenceOf(served, confusion, threshold);
  } catch (e) {
    if (!(e instanceof NotFoundError)) throw e;
  }
  return summarize(model, deltas, reference, threshold, now);
}

/** Counter deltas of one version added into one (for roll-ups). */
function sumCounters(list: Counters[]): Counters {
  const first = list[0] as Counters;
  const sum: Counters = { ...first, labels: { ...first.labels }, confidence: [...first.confidence] };
  for (const c of list.slice(1)) mergeCounters(sum, c);
  return sum;
}

/** Models with anything under `captures/`. */
export async function modelsWithTraffic(store: ObjectStore): Promise<string[]> {
  const out: string[] = [];
  for await (const prefix of store.listFolders(keys.capturesRoot)) out.push(prefix.slice(keys.capturesRoot.length, -1));
  return out;
}

/**
 * The nightly step before planning: for every model the edge has seen traffic for, apply the review
 * decisions (so tonight's run trains on accepted images) and write the monitoring summary the console
 * shows. One model's failure is logged and does not stop the others or the training.
 */
export async function processTraffic(
  store: ObjectStore,
  log: Logger,
  operatorKeys: readonly string[] = operatorKeysFromEnv(),
): Promise<{ model: string; applied?: ApplyResult; drift: string[] }[]> {
  const out: { model: string; applied?: ApplyResult; drift: string[] }[] = [];
  for (const model of await modelsWithTraffic(store)) {
    try {
      const applied = await applyDecisions(store, model, log, { operatorKeys });
      const summary = await monitor(store, model, { rollUp: true });
      await store.put(keys.captureMonitor(model), JSON.stringify(summary), "application/json");
      // Alerts judge yesterday, the last complete UTC day (the run at night sees only the first hours of
      // today); a day without traffic alerts nothing, and an older day is not alerted again.
      const yesterday = new Date(Date.now() - 86_400_000).toISOString().slice(0, 10);
      const complete = summary.days.find((d) => d.day === yesterday);
      const drift = complete?.drift ?? [];
      for (const d of drift) log.warn(`${model}: drift on ${complete?.day}: ${d}`);
      out.push({ model, applied, drift });
    } catch (e) {
      log.warn(`${model}: traffic not processed (${userMessage(e)})`);
      out.push({ model, drift: [] });
    }
  }
  return out;
}

export function parseRate(value: string, what: string): number {
  const n = Number(value.endsWith("%") ? Number(value.slice(0, -1)) / 100 : value);
  if (!Number.isFinite(n) || n < 0 || n > 1) throw new InvalidOptionError(what, value, ["a number from 0 to 1", "a percentage such as 5%"]);
  return n;
}
