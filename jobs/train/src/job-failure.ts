import { constants } from "node:os";
import type { ObjectStore } from "#shared/s3/store.ts";
import { releaseLocksOfJob } from "./release/lock.ts";
import { adoptQueued, listRunStatuses, type RunStatus, StatusRecorder } from "./status.ts";

/**
 * A training job that died without closing its status record (killed, out of memory, crashed): whoever
 * sees it end — the local dispatcher (its child's exit), or in AWS a handler of Batch's job state-change
 * events — marks its runs `failed` with a plain reason and frees its model locks, so `push --wait` and
 * `edgetune status` say what happened at once and the next run does not wait for the lock to go stale.
 */

/** How a process ended: a signal, or an exit code (a container's 128 + n also means signal n). */
export interface ProcessEnd {
  code?: number | null;
  signal?: NodeJS.Signals | string | null;
}

/** The sentence a user reads for an abnormal end of the training process; undefined for a clean exit. */
export function exitReason(end: ProcessEnd): string | undefined {
  const signal = end.signal ?? signalOfExitCode(end.code);
  if (signal === "SIGKILL") return "the training process was killed (SIGKILL) — out of memory or stopped by hand";
  if (signal === "SIGTERM" || signal === "SIGINT") return `the training process was stopped (${signal})`;
  if (signal) return `the training process crashed (${signal})`;
  if (end.code === 0 || end.code === undefined || end.code === null) return undefined;
  return `the training process exited with code ${end.code}`;
}

/** Shells and container runtimes report a death by signal n as exit code 128 + n (137: SIGKILL). */
function signalOfExitCode(code: number | null | undefined): string | undefined {
  if (code === undefined || code === null || code <= 128 || code > 128 + 64) return undefined;
  return Object.entries(constants.signals).find(([, n]) => n === code - 128)?.[0];
}

export interface FailedJob {
  /** The records now `failed` (one per dataset the job was training). */
  runs: RunStatus[];
  /** Models whose lock the job held and that are free again. */
  freedLocks: string[];
}

/**
 * Closes what job `jobId` left open: its `running` records become `failed` with `reason` (and where it
 * was), its locks are released. A job that died before writing any record, for a single dataset, gets
 * one (adopting the queued record of its push, if any), so a waiting `push --wait` ends too. Records of
 * other jobs, finished records and hand-overs (`queued`, a continuation will adopt them) are left alone.
 */
export async function failJob(store: ObjectStore, job: { jobId: string; dataset?: string }, reason: string): Promise<FailedJob> {
  const recent = await listRunStatuses(store, job.dataset, job.dataset ? 20 : 100);
  const open = recent.filter((r) => r.jobId === job.jobId && r.state === "running");
  const runs: RunStatus[] = [];
  for (const r of open) {
    const record = new StatusRecorder(store, r.dataset, r.state, { runId: r.runId, startedAt: r.startedAt });
    await record.update({ ...r, state: "failed", reason: r.phase ? `${reason} (during ${r.phase})` : reason, progress: undefined }, true);
    runs.push(record.current);
  }
  if (runs.length === 0 && job.dataset && !recent.some((r) => r.jobId === job.jobId)) {
    const record = new StatusRecorder(store, job.dataset, "failed", { ...(await adoptQueued(store, job.dataset)), jobId: job.jobId });
    await record.update({ reason }, true);
    runs.push(record.current);
  }
  return { runs, freedLocks: await releaseLocksOfJob(store, job.jobId) };
}
