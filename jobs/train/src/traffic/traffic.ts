import { z } from "zod";
import { readMetadata, readPointer, readVerifiedFile } from "#shared/artifacts.ts";
import { listModels } from "#shared/catalog.ts";
import { ARTIFACT_FILES } from "#shared/contracts/artifact.ts";
import {
  CAPTURE_OFF,
  type CaptureConfig,
  type Counters,
  captureConfigSchema,
  captureRule,
  DEFAULT_BELOW,
  lowConfidenceThreshold,
  mergeCounters,
  noCounts,
  withinDeltaCaps,
} from "#shared/contracts/capture.ts";
import { parseContract, tryParseContractJson } from "#shared/contracts/parse.ts";
import { InvalidOptionError, NotFoundError, userMessage } from "#shared/errors.ts";
import { keys } from "#shared/keys.ts";
import { type MonitorSummary, parseCounters, referenceOf, summarize } from "#shared/monitor.ts";
import { getText, type ObjectStore } from "#shared/s3/store.ts";
import type { Logger } from "../log.ts";
import { budgeted, ReadBudget, ReadBudgetExhausted } from "./budget.ts";
import { type ApplyResult, applyDecisions, getCapped, operatorKeysFromEnv, servedMetadata } from "./review.ts";

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
 * Bounds on what the monitor reads from `captures/<model>/counters/`, which the edge's key may write
 * (forged files must not exhaust the nightly job): a delta file over MAX_COUNTER_FILE_BYTES is skipped by
 * its listed size, never downloaded (a real one names the labels answered in one isolate's minute: at
 * some 20 answers a second, 1200 labels of 100 characters at most, 130 KB); at most
 * MAX_COUNTER_FILES_PER_DAY deltas and MAX_VERSIONS_PER_DAY versions are read per day (the rest waits for
 * the next night); a roll-up, which names the deltas it replaced until they are deleted, may be larger.
 */
const MAX_COUNTER_FILE_BYTES = 256 * 1024;
const MAX_ROLLUP_BYTES = 4 * 1024 * 1024;
const MAX_COUNTER_FILES_PER_DAY = 20_000;
const MAX_VERSIONS_PER_DAY = 20;

/** What the monitor left out, and why (forged or broken files under captures/; a day with more files than it reads). */
export interface CountersSkipped {
  tooLarge: number;
  invalid: number;
  /** Deltas of a version the model does not have, or naming a label that version does not have. */
  unknownLabels: number;
  /** Files past the per-day bounds, left for the next night. */
  overLimit: number;
}

/**
 * Adds up the edge's counter deltas of the last `days` days and compares them with the served version's
 * held-out split. Every number is bounded before it is summed or held (contracts/capture.ts): files by
 * size and count, values by `withinDeltaCaps`, labels by the version's own labels, sums saturating.
 * Past days' deltas are rolled up into one file per version and day (`rollUp`) — written, and checked
 * readable, before the deltas it replaces are deleted; a version whose earlier roll-up is unreadable is
 * left as it is (never overwritten with less).
 */
export async function monitor(
  store: ObjectStore,
  model: string,
  options: { days?: number; rollUp?: boolean; now?: Date; skipped?: CountersSkipped } = {},
): Promise<MonitorSummary> {
  const now = options.now ?? new Date();
  const dayOf = (ms: number) => new Date(ms).toISOString().slice(0, 10);
  const since = dayOf(now.getTime() - ((options.days ?? 30) - 1) * 86_400_000);
  const latest = dayOf(now.getTime() + 86_400_000); // an edge clock a little ahead
  const cutoff = dayOf(now.getTime() - KEEP_DELTAS_DAYS * 86_400_000);
  const skipped = options.skipped ?? { tooLarge: 0, invalid: 0, unknownLabels: 0, overLimit: 0 };
  const labelsOf = versionLabels(store, model);
  const sums: Counters[] = [];
  // Day folders from dates, oldest first, never from a listing the edge's key can fill with junk folders.
  const days: string[] = [];
  for (let day = since; day <= latest; day = dayOf(Date.parse(`${day}T00:00:00Z`) + 86_400_000)) days.push(day);
  for (const day of days) {
    const counted = await countDay(store, model, day, labelsOf, skipped, options.rollUp === true);
    sums.push(...[...counted.versions.values()].map((v) => v.sum));
    if (options.rollUp && day < cutoff) await rollUpDay(store, model, day, counted);
  }
  let reference = null;
  let threshold = DEFAULT_BELOW;
  try {
    const served = await servedMetadata(store, model);
    const config = await readCaptureConfig(store, model);
    threshold = lowConfidenceThreshold(config);
    // The confusion matrix gives the held-out predicted-label shares; without a readable report, the
    // true-label shares (per-class support) stand in.
    const report = await readVerifiedFile(store, served, ARTIFACT_FILES.report)
      .then((bytes) => JSON.parse(new TextDecoder().decode(bytes)) as { confusion?: number[][]; heldOutScores?: unknown })
      .catch(() => null);
    const kept = report?.heldOutScores;
    const scores = Array.isArray(kept) && kept.every((s): s is number => typeof s === "number") ? kept : null;
    reference = referenceOf(served, report?.confusion ?? null, threshold, scores);
  } catch (e) {
    if (!(e instanceof NotFoundError)) throw e;
  }
  return summarize(model, sums, reference, threshold, now);
}

/** One version's counts of one day: the sum, the delta files in it, and its roll-up's state. */
interface VersionDay {
  sum: Counters;
  /** Delta files added into `sum` (deleted once a roll-up holds them). */
  loose: string[];
  /** An earlier roll-up of this version exists but could not be read: it is not replaced. */
  rollupUnreadable: boolean;
}
interface CountedDay {
  versions: Map<string, VersionDay>;
  /** Deltas a readable roll-up already holds that are still there (its clean-up was interrupted). */
  covered: string[];
}

const rollupFileSchema = z.object({ covers: z.array(z.string().max(1024)).max(MAX_COUNTER_FILES_PER_DAY).default([]) });

/** Each version's counts of `day`: its roll-up (if any) plus the deltas the roll-up does not hold, bounded throughout. */
async function countDay(
  store: ObjectStore,
  model: string,
  day: string,
  labelsOf: (version: string) => Promise<ReadonlySet<string> | null>,
  skipped: CountersSkipped,
  prune: boolean,
): Promise<CountedDay> {
  const dayPrefix = `${keys.captureCounters(model)}${day}/`;
  const byVersion = new Map<string, VersionDay>();
  const covered = new Set<string>();
  /** A counter file, read within `maxBytes`, checked, and of a version with room for it; else null (counted as skipped). */
  /** Files that are not the edge's (too large, unreadable, another model's or day's, labels the version lacks): deleted at night, else read again every night. */
  const notCounters: string[] = [];
  const reject = (key: string, why: Exclude<keyof CountersSkipped, "overLimit">, deletable = true) => {
    skipped[why]++;
    if (deletable) notCounters.push(key);
  };
  /** `ownRollup`: a roll-up under its version's name, kept even when unreadable (its deltas stay until a person looks). */
  const read = async (o: { key: string; size: number }, maxBytes: number, ownRollup = false) => {
    if (o.size > maxBytes) return reject(o.key, "tooLarge", !ownRollup);
    // Capped while read too: the file may have been replaced since it was listed.
    const bytes = await getCapped(store, o.key, maxBytes);
    if (!bytes) return reject(o.key, "tooLarge", !ownRollup);
    const counters = parseCounters(bytes);
    if (!counters || counters.model !== model || counters.from.slice(0, 10) !== day) return reject(o.key, "invalid", !ownRollup);
    if (!byVersion.has(counters.version) && byVersion.size >= MAX_VERSIONS_PER_DAY) return void skipped.overLimit++;
    const labels = await labelsOf(counters.version);
    if (!labels || Object.keys(counters.labels).some((l) => !labels.has(l))) return reject(o.key, "unknownLabels", !ownRollup);
    return { counters, bytes };
  };
  const entry = (c: Counters) => {
    let e = byVersion.get(c.version);
    if (!e) {
      e = { sum: { ...c, ...noCounts() }, loose: [], rollupUnreadable: false };
      byVersion.set(c.version, e);
    }
    return e;
  };
  try {
    return await readDay();
  } finally {
    // Also when tonight's reading stops at its limit: what was found so far is not read again.
    if (prune && notCounters.length > 0) await store.delete(notCounters);
  }

  async function readDay(): Promise<CountedDay> {
    // The roll-ups first (sorted after the deltas): they say which deltas they already hold.
    for await (const o of store.list(`${dayPrefix}rollup-`)) {
      const version = o.key.slice(`${dayPrefix}rollup-`.length, -".json".length);
      // Only a version's own roll-up is kept when unreadable (until a person looks); any other name is not the job's.
      if (!/^v[0-9a-f]{12}$/.test(version) || o.key !== keys.captureCounterFile(model, day, `rollup-${version}`)) {
        reject(o.key, "invalid");
        continue;
      }
      const got = await read(o, MAX_ROLLUP_BYTES, true);
      if (!got || got.counters.version !== version) {
        // Not replaced by tonight's roll-up, whatever it holds: its deltas stay until a person looks.
        const known = byVersion.get(version);
        if (known) known.rollupUnreadable = true;
        else if (byVersion.size < MAX_VERSIONS_PER_DAY && /^v[0-9a-f]{12}$/.test(version))
          byVersion.set(version, { sum: emptyCounters(model, version, day), loose: [], rollupUnreadable: true });
        continue;
      }
      const e = entry(got.counters);
      mergeCounters(e.sum, got.counters);
      const covers = tryParseContractJson(rollupFileSchema, got.bytes);
      for (const k of covers.success ? covers.data.covers : []) covered.add(k);
    }
    let files = 0;
    const stillThere: string[] = [];
    for await (const o of store.list(dayPrefix)) {
      if (o.key.startsWith(`${dayPrefix}rollup-`)) continue;
      if (covered.has(o.key)) {
        stillThere.push(o.key);
        continue;
      }
      if (++files > MAX_COUNTER_FILES_PER_DAY) {
        skipped.overLimit++;
        break;
      }
      const got = await read(o, MAX_COUNTER_FILE_BYTES);
      if (!got) continue;
      if (!withinDeltaCaps(got.counters)) {
        reject(o.key, "invalid");
        continue;
      }
      const e = entry(got.counters);
      mergeCounters(e.sum, got.counters);
      e.loose.push(o.key);
    }
    return { versions: byVersion, covered: stillThere };
  }
}

/** The roll-up of one day: per version, one file holding the earlier roll-up and the deltas, written before they are deleted. */
async function rollUpDay(store: ObjectStore, model: string, day: string, counted: CountedDay): Promise<void> {
  // Held by the roll-ups already read, which stay: a clean-up interrupted last night ends now.
  if (counted.covered.length > 0) await store.delete(counted.covered);
  for (const [version, e] of counted.versions) {
    if (e.rollupUnreadable || e.loose.length === 0) continue;
    const key = keys.captureCounterFile(model, day, `rollup-${version}`);
    // Sums saturate, so this always holds; checked anyway, since what follows deletes the deltas.
    if (!parseCounters(new TextEncoder().encode(JSON.stringify(e.sum)))) continue;
    await store.put(key, JSON.stringify({ ...e.sum, covers: e.loose }), "application/json");
    await store.delete(e.loose);
    // Deleted: the roll-up need not name them any more.
    await store.put(key, JSON.stringify(e.sum), "application/json");
  }
}

const emptyCounters = (model: string, version: string, day: string): Counters => ({
  schemaVersion: 1,
  model,
  version,
  from: `${day}T00:00:00.000Z`,
  to: `${day}T00:00:00.000Z`,
  ...noCounts(),
});

/** The labels of each version of `model` (null: no such version), read once per version. */
function versionLabels(store: ObjectStore, model: string): (version: string) => Promise<ReadonlySet<string> | null> {
  const known = new Map<string, Promise<ReadonlySet<string> | null>>();
  return (version) => {
    let labels = known.get(version);
    if (!labels) {
      labels = readMetadata(store, model, version).then(
        (m) => new Set(m.labels),
        (e) => {
          if (e instanceof NotFoundError) return null;
          throw e;
        },
      );
      known.set(version, labels);
    }
    return labels;
  };
}

/**
 * Models with anything under `captures/`: of the models the job made (`models/`, which the edge cannot
 * write), those whose capture folder is not empty. Folders the edge's key adds under captures/ for
 * models that do not exist cost the nightly run nothing.
 */
export async function modelsWithTraffic(store: ObjectStore): Promise<string[]> {
  const out: string[] = [];
  for (const model of await listModels(store)) {
    for await (const _ of store.list(keys.captures(model))) {
      out.push(model);
      break;
    }
  }
  return out;
}

/**
 * The nightly traffic step: for every model the edge has seen traffic for, apply the review decisions
 * and write the monitoring summary the console shows. Everything it reads goes through one budget for the
 * night (`budget.ts`): once spent, the remaining models wait for the next night. One model's failure is
 * logged and does not stop the others.
 */
export async function processTraffic(
  store: ObjectStore,
  log: Logger,
  operatorKeys: readonly string[] = operatorKeysFromEnv(),
  budget: ReadBudget = new ReadBudget(),
): Promise<{ model: string; applied?: ApplyResult; drift: string[] }[]> {
  const out: { model: string; applied?: ApplyResult; drift: string[] }[] = [];
  const limited = budgeted(store, budget);
  for (const model of await modelsWithTraffic(limited)) {
    try {
      const applied = await applyDecisions(limited, model, log, { operatorKeys });
      const skipped: CountersSkipped = { tooLarge: 0, invalid: 0, unknownLabels: 0, overLimit: 0 };
      const summary = await monitor(limited, model, { rollUp: true, skipped });
      const ignored = Object.entries(skipped).filter(([, n]) => n > 0);
      if (ignored.length > 0)
        log.warn(
          `${model}: counter files not counted (${ignored.map(([why, n]) => `${n} ${why}`).join(", ")}): not the edge's (deleted), or more than a night reads`,
        );
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
      if (e instanceof ReadBudgetExhausted) break;
    }
  }
  return out;
}

/** `--below`: "unsure" (unset: classify's own notion) or a score; undefined clears the operator's number. */
export function parseBelow(value: string): number | undefined {
  if (value.trim().toLowerCase() === "unsure") return undefined;
  try {
    return parseRate(value, "--below");
  } catch {
    throw new InvalidOptionError("--below", value, ["unsure (the served version's per-label thresholds)", "a number from 0 to 1", "a percentage such as 5%"]);
  }
}

/** Which inputs capture stores for being unsure, in words (CLI; the console says the same). */
export function captureRuleText(config: Pick<CaptureConfig, "belowConfidence">): string {
  const rule = captureRule(config);
  return rule.kind === "below"
    ? `inputs scored below ${rule.score} (a set number; --below unsure follows the answers' own thresholds)`
    : `inputs the served version answers unsure (below their label's threshold; under ${DEFAULT_BELOW} for a version trained before thresholds)`;
}

export function parseRate(value: string, what: string): number {
  const n = Number(value.endsWith("%") ? Number(value.slice(0, -1)) / 100 : value);
  if (!Number.isFinite(n) || n < 0 || n > 1) throw new InvalidOptionError(what, value, ["a number from 0 to 1", "a percentage such as 5%"]);
  return n;
}
