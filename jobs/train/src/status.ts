import { randomBytes } from "node:crypto";
import { nameSchema } from "#shared/contracts/common.ts";
import { keys } from "#shared/keys.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import type { Logger } from "./log.ts";

/**
 * What a training run is doing, or did, as a small record in the bucket — `status/<dataset>/<runId>.json`
 * (run ids sort by time) — so anyone can follow a run without its log: `edgetune status`, `push --wait`.
 * `push` writes a "queued" record, which the run it triggered takes over (`adoptQueued`); the run writes
 * "running" with its phase and progress, then "done" (promoted or not, and why) or "failed" (the reason a
 * user can act on).
 */
export type RunState = "queued" | "running" | "done" | "failed";

export interface RunStatus {
  schemaVersion: 1;
  runId: string;
  dataset: string;
  state: RunState;
  phase?: string;
  progress?: { done: number; total: number };
  model?: string;
  version?: string;
  promoted?: boolean;
  accuracy?: number;
  reason?: string;
  /** True when the run found its version already trained (same dataset and options): nothing changed. */
  unchanged?: boolean;
  /** Where the report is, when the run wrote a version. */
  report?: string;
  /** How many times the run handed its extraction over to array jobs (a continuation adopts it again). */
  handOvers?: number;
  /** The job the run is part of: AWS Batch's job id, or the local dispatcher's (`jobIdFromEnv`). */
  jobId?: string;
  startedAt: string;
  updatedAt: string;
}

export const TERMINAL: readonly RunState[] = ["done", "failed"];

/**
 * The id of the job this process runs as: AWS Batch's, or the one the local dispatcher gives its child
 * (`EDGETUNE_JOB_ID`), so that whoever sees the job end (job-failure.ts) can find its records and lock.
 */
export function jobIdFromEnv(env: NodeJS.ProcessEnv = process.env): string | undefined {
  return env.AWS_BATCH_JOB_ID || env.EDGETUNE_JOB_ID || undefined;
}

export function newRunId(now = new Date()): string {
  return `${now.toISOString().replace(/[-:.]/g, "")}-${randomBytes(3).toString("hex")}`;
}

/** `jobId`: who writes for the job from outside it (job-failure.ts); the process's own job by default. */
interface RecorderOptions {
  runId?: string;
  startedAt?: string;
  minIntervalMs?: number;
  jobId?: string;
}

/** Writes one run's record: every state change at once, progress at most every `minIntervalMs`. */
export class StatusRecorder {
  private status: RunStatus;
  private lastWrite = 0;
  private pending: Promise<void> = Promise.resolve();
  private readonly store: ObjectStore;
  private readonly minIntervalMs: number;
  private readonly enabled: boolean;

  constructor(store: ObjectStore, dataset: string, state: RunState, options: RecorderOptions = {}) {
    this.store = store;
    this.minIntervalMs = options.minIntervalMs ?? 2000;
    // A name that is no dataset name (the run will refuse it) gets no record: it would be no key either.
    this.enabled = nameSchema.safeParse(dataset).success;
    const now = new Date().toISOString();
    this.status = {
      schemaVersion: 1,
      runId: options.runId ?? newRunId(),
      dataset,
      state,
      jobId: options.jobId ?? jobIdFromEnv(),
      startedAt: options.startedAt ?? now,
      updatedAt: now,
    };
  }

  get current(): RunStatus {
    return this.status;
  }

  /** Merges `patch`; writes now if the state or phase changed (or `force`), else when the interval allows. */
  update(patch: Partial<RunStatus>, force = false): Promise<void> {
    const significant =
      force || (patch.state !== undefined && patch.state !== this.status.state) || (patch.phase !== undefined && patch.phase !== this.status.phase);
    this.status = { ...this.status, ...patch, updatedAt: new Date().toISOString() };
    if (!this.enabled || (!significant && Date.now() - this.lastWrite < this.minIntervalMs)) return this.pending;
    this.lastWrite = Date.now();
    const body = JSON.stringify(this.status, null, 2);
    // Writes in order; a failed status write never fails the run (the run's own result is what counts).
    const key = keys.runStatus(this.status.dataset, this.status.runId);
    this.pending = this.pending
      .then(async () => {
        await this.store.put(key, body, "application/json");
      })
      .catch(() => {});
    return this.pending;
  }

  /** A logger that also records phases' progress. */
  logger(log: Logger): Logger {
    return {
      info: (m, f) => log.info(m, f),
      warn: (m, f) => log.warn(m, f),
      progress: (phase, done, total) => {
        log.progress(phase, done, total);
        void this.update({ phase, progress: { done, total } });
      },
    };
  }
}

/** A queued record older than this is not adopted: its trigger was lost, and a new run is its own. */
const ADOPT_WITHIN_MS = 6 * 60 * 60 * 1000;

/**
 * The run id a starting run should write to: the newest record of `dataset` if it is still "queued"
 * (a push, or a run that handed over to array jobs) and recent, so that one run is one record from push
 * to end. Exactly one run adopts a record: it claims it first with a conditional create of
 * `<runId>.claim-<n>` (n counts hand-overs, so a continuation can claim its parent's record again);
 * a second run of the same trigger loses the claim and writes a record of its own.
 */
export async function adoptQueued(store: ObjectStore, dataset: string): Promise<{ runId: string; startedAt: string } | undefined> {
  if (!nameSchema.safeParse(dataset).success) return undefined;
  const [newest] = await listRunStatuses(store, dataset, 1).catch(() => []);
  if (newest?.state !== "queued" || Date.now() - Date.parse(newest.updatedAt) > ADOPT_WITHIN_MS) return undefined;
  const claim = `${keys.runStatus(dataset, newest.runId).replace(/\.json$/, "")}.claim-${newest.handOvers ?? 0}`;
  const won = await store.putIfAbsent(claim, JSON.stringify({ jobId: jobIdFromEnv() ?? null, at: new Date().toISOString() })).catch(() => false);
  return won ? { runId: newest.runId, startedAt: newest.startedAt } : undefined;
}

/** Recent runs, newest first: of one dataset, or of every dataset. */
export async function listRunStatuses(store: ObjectStore, dataset?: string, limit = 20): Promise<RunStatus[]> {
  const found: string[] = [];
  for await (const o of store.list(dataset ? keys.runStatuses(dataset) : keys.statusRoot)) if (o.key.endsWith(".json")) found.push(o.key);
  const newest = found.sort((a, b) => runIdOf(b).localeCompare(runIdOf(a))).slice(0, limit);
  const out: RunStatus[] = [];
  for (const key of newest) {
    const bytes = await store.get(key);
    if (bytes) out.push(JSON.parse(new TextDecoder().decode(bytes)) as RunStatus);
  }
  return out;
}

const runIdOf = (key: string) => key.slice(key.lastIndexOf("/") + 1);

/**
 * Follows `dataset`'s runs that started at or after `since` (a push) until one ends; calls `onChange` on
 * every new state, phase or progress. Resolves with the final record, or null after `timeoutMs`.
 */
export async function followRun(
  store: ObjectStore,
  dataset: string,
  since: string,
  onChange: (s: RunStatus) => void,
  options: { pollMs?: number; timeoutMs?: number } = {},
): Promise<RunStatus | null> {
  const deadline = Date.now() + (options.timeoutMs ?? 6 * 60 * 60 * 1000);
  let last = "";
  while (Date.now() < deadline) {
    const run = (await listRunStatuses(store, dataset, 5)).find((s) => s.state !== "queued" && s.startedAt >= since);
    if (run) {
      const seen = JSON.stringify([run.state, run.phase, run.progress]);
      if (seen !== last) onChange(run);
      last = seen;
      if (TERMINAL.includes(run.state)) return run;
    }
    await new Promise((r) => setTimeout(r, options.pollMs ?? 1000));
  }
  return null;
}
