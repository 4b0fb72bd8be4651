import { readPointer, readVerifiedFile } from "../../../../shared/artifacts.ts";
import { ARTIFACT_FILES } from "../../../../shared/contracts/artifact.ts";
import { CAPTURE_OFF, type CaptureConfig, type Counters, captureConfigSchema, mergeCounters } from "../../../../shared/contracts/capture.ts";
import { parseContract } from "../../../../shared/contracts/parse.ts";
import { InvalidOptionError, NotFoundError, userMessage } from "../../../../shared/errors.ts";
import { keys } from "../../../../shared/keys.ts";
import { type MonitorSummary, parseCounters, referenceOf, summarize } from "../../../../shared/monitor.ts";
import { getText, type ObjectStore } from "../../../../shared/s3/store.ts";
import type { Logger } from "../log.ts";
import { type ApplyResult, applyDecisions, operatorKeysFromEnv, servedMetadata } from "./review.ts";

export { type ApplyResult, applyDecisions, listCaptures, type PendingCapture, reviewNow } from "./review.ts";

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
