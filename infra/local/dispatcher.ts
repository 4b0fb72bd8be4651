import { spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { listModels } from "#shared/catalog.ts";
import { type RequestOutcome, requestOfKey } from "#shared/contracts/request.ts";
import { datasetNameFromManifestKey, keys } from "#shared/keys.ts";
import type { S3Config } from "#shared/s3/config.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import { exitReason, failJob } from "../../jobs/train/src/job-failure.ts";
import { formatLogLine } from "../../jobs/train/src/log.ts";
import { jobEnvironment } from "./job-env.ts";

/**
 * The local stand-in for the cloud wiring in infra/constructs/triggers.ts, with the same rules:
 *  - "Object Created" for `datasets/<name>/manifest.json` → one job with that key as its `dataset`
 *    parameter (here: found by polling ListObjectsV2 for new keys or ETags, as no local S3 server
 *    emits bucket events);
 *  - the nightly schedule → one job with `dataset` = `*` (here: every `nightlyMs`, if set);
 *  - "Object Created" for a console request `captures/<model>/requests/<id>.json` → one job with that key
 *    (here: found by the same polling, per model), applying that model's requests.
 * A job is exactly what the Batch container runs: `edgetune train --dataset <param> --json`, as a
 * child process. Training jobs run one at a time, in order, like a queue with one host; console requests
 * have a queue of their own, so a rollback does not wait for a training run to end. A request's "train
 * now" comes back as a `train-requested` line, and that training joins the training queue.
 * A child that dies (a signal, or a non-zero exit) is what Batch's state-change event is in the cloud:
 * its open status records become `failed` with the reason and its locks are freed (job-failure.ts)
 * before the next job starts.
 */
export interface JobRecord {
  dataset: string;
  reason: "dataset-complete" | "nightly" | "console-request" | "train-now";
  status: "queued" | "running" | "succeeded" | "failed";
  exitCode?: number;
  /** The job id its child runs as (EDGETUNE_JOB_ID): its status records and locks carry it. */
  jobId?: string;
  /** The child's process id while it runs. */
  pid?: number;
  /** Why it failed, when the child died rather than finishing (job-failure.ts). */
  failure?: string;
  results: { status: string; model: string; version: string; promoted: boolean; accuracy?: number; reason: string }[];
  /** What a console-request job did with each request (its JSON lines). */
  outcomes?: (RequestOutcome & { model: string })[];
  /** The end of the job's log when its output is collected (for the user, and for a failed test). */
  logTail?: string;
  startedAt?: number;
  finishedAt?: number;
}

export interface DispatcherOptions {
  store: ObjectStore;
  s3: S3Config;
  pollMs?: number;
  nightlyMs?: number;
  /** Extra `edgetune train` flags (the local default trains small and fast). */
  trainArgs?: string[];
  /** Where job output goes: to the terminal as readable lines, or only collected. */
  output?: "pretty" | "collect";
  onJob?: (job: JobRecord) => void;
}

export class Dispatcher {
  readonly jobs: JobRecord[] = [];
  private readonly seen = new Map<string, string>();
  private timer?: NodeJS.Timeout;
  private nightly?: NodeJS.Timeout;
  private queue: Promise<void> = Promise.resolve();
  private requestQueue: Promise<void> = Promise.resolve();
  /** Models with a request job queued and not started yet: one more poll adds no second one. */
  private readonly requestsQueued = new Set<string>();
  private polling = false;
  private stopped = false;
  private readonly children = new Set<ReturnType<typeof spawn>>();
  readonly options: DispatcherOptions;

  constructor(options: DispatcherOptions) {
    this.options = options;
  }

  /** Starts polling. Manifests already present count as new (like a fresh deployment's first events). */
  start(): void {
    this.timer = setInterval(() => void this.poll(), this.options.pollMs ?? 1000);
    if (this.options.nightlyMs) this.nightly = setInterval(() => this.submit("*", "nightly"), this.options.nightlyMs);
    void this.poll();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    clearInterval(this.nightly);
    for (const child of this.children) child.kill("SIGTERM");
    await Promise.all([this.queue.catch(() => {}), this.requestQueue.catch(() => {})]);
  }

  /** Resolves when every job queued so far has finished (a request's training run included). */
  async idle(): Promise<void> {
    await this.requestQueue;
    await this.queue;
  }

  async poll(): Promise<void> {
    if (this.polling || this.stopped) return;
    this.polling = true;
    try {
      for await (const o of this.options.store.list(keys.datasetsRoot)) {
        if (!datasetNameFromManifestKey(o.key)) continue;
        // S3 sends an event for every write, even of the same bytes (a dataset pushed again): the
        // write time tells those apart where the ETag alone would not.
        const version = `${o.etag}|${o.modified ?? ""}`;
        if (this.seen.get(o.key) === version) continue;
        this.seen.set(o.key, version);
        this.submit(o.key, "dataset-complete");
      }
      await this.pollRequests();
    } catch {
      // the local S3 server is stopping or briefly unreachable: try again at the next tick
    } finally {
      this.polling = false;
    }
  }

  /** Console requests of every model: one job per model with requests waiting and none queued. */
  private async pollRequests(): Promise<void> {
    for (const model of await listModels(this.options.store)) {
      for await (const o of this.options.store.list(keys.captureRequests(model))) {
        if (!requestOfKey(o.key) || this.requestsQueued.has(model) || this.seen.get(o.key) === o.etag) continue;
        this.seen.set(o.key, o.etag);
        this.requestsQueued.add(model);
        this.submit(o.key, "console-request");
      }
    }
  }

  submit(dataset: string, reason: JobRecord["reason"]): JobRecord {
    const job: JobRecord = { dataset, reason, status: "queued", results: [] };
    this.jobs.push(job);
    this.options.onJob?.(job);
    if (reason === "console-request") this.requestQueue = this.requestQueue.then(() => this.run(job));
    else this.queue = this.queue.then(() => this.run(job));
    return job;
  }

  private run(job: JobRecord): Promise<void> {
    const request = requestOfKey(job.dataset);
    if (request) this.requestsQueued.delete(request.model); // from here a new request needs a job of its own
    if (this.stopped) return Promise.resolve();
    job.status = "running";
    job.startedAt = Date.now();
    this.options.onJob?.(job);
    const s3 = this.options.s3;
    job.jobId = `local-${randomUUID()}`;
    const env = jobEnvironment(s3, { EDGETUNE_JOB_ID: job.jobId });
    const cli = join(import.meta.dirname, "..", "..", "jobs", "train", "cli.ts");
    // --json as in the Batch container: the result line on stdout is read below.
    const args = [cli, "train", "--dataset", job.dataset, "--json", ...(this.options.trainArgs ?? []).filter((a) => a !== "--json")];
    return new Promise((resolve) => {
      const child = spawn(process.execPath, args, { env, stdio: ["ignore", "pipe", "pipe"] });
      this.children.add(child);
      job.pid = child.pid;
      let stdout = "";
      child.stdout?.on("data", (d) => {
        stdout += d;
      });
      let stderr = "";
      let partial = "";
      child.stderr?.on("data", (d) => {
        stderr = (stderr + d).slice(-4000);
        if (this.options.output !== "pretty") return;
        // The job logs JSON lines (for CloudWatch); a person at `npm start` reads them as sentences.
        const lines = (partial + d).split("\n");
        partial = lines.pop() ?? "";
        for (const l of lines) if (l) process.stderr.write(`          │ ${formatLogLine(l)}\n`);
      });
      child.on("exit", async (code, signal) => {
        job.failure = exitReason({ code, signal });
        // Before the next job starts: it may need the lock this one held.
        if (job.failure) await this.closeDeadJob(job, job.failure);
        job.exitCode = code ?? -1;
        job.status = code === 0 ? "succeeded" : "failed";
        job.finishedAt = Date.now();
        if (stderr) job.logTail = stderr;
        const lines = stdout
          .split("\n")
          .filter((l) => l.startsWith("{"))
          .map((l) => JSON.parse(l) as { status: string; dataset?: string });
        job.results = lines.filter((l) => l.status !== "request" && l.status !== "train-requested") as JobRecord["results"];
        job.outcomes = lines.filter((l) => l.status === "request") as unknown as JobRecord["outcomes"];
        // "Train now": the run a push would start, in the training queue.
        for (const l of lines) if (l.status === "train-requested" && l.dataset) this.submit(l.dataset, "train-now");
        this.children.delete(child);
        job.pid = undefined;
        this.options.onJob?.(job);
        resolve();
      });
    });
  }

  private async closeDeadJob(job: JobRecord, reason: string): Promise<void> {
    const dataset = job.dataset === "*" ? undefined : (datasetNameFromManifestKey(job.dataset) ?? job.dataset);
    try {
      const closed = await failJob(this.options.store, { jobId: job.jobId as string, dataset }, reason);
      if (this.options.output === "pretty")
        process.stderr.write(`          │ ${closed.runs.length} run(s) marked failed; lock(s) freed: ${closed.freedLocks.join(", ") || "none"}\n`);
    } catch {
      // the local S3 server is gone (npm start stopping): nothing left to tell
    }
  }
}
