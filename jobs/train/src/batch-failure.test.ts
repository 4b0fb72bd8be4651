import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { keys } from "#shared/keys.ts";
import { handler } from "../../../infra/functions/job-failed.ts";
import { type LocalS3, startLocalS3 } from "../../../infra/local/s3-server.ts";
import { type BatchJobDetail, failureOf, plainReason } from "./batch-failure.ts";
import { followRun, listRunStatuses, type RunStatus } from "./status.ts";

/**
 * "Batch Job State Change" events in the shape AWS documents (batch_job_events.html: the detail is the
 * JobDetail of DescribeJobs), for the failures the job's own code never sees.
 */
const queue = "arn:aws:batch:us-east-1:123456789012:job-queue/Edgetune-finetune";
function failedJob(overrides: Partial<BatchJobDetail>): BatchJobDetail {
  return {
    jobId: "4c7599ae-0a82-49aa-ba5a-4727fcce14a8",
    jobName: "edgetune-finetune-pets",
    jobQueue: queue,
    status: "FAILED",
    createdAt: 1641944200058,
    stoppedAt: 1641944260058,
    retryStrategy: { attempts: 3 },
    parameters: { dataset: "pets" },
    attempts: [],
    ...overrides,
  };
}
const oom = failedJob({
  statusReason: "Essential container in task exited",
  attempts: [
    {
      container: { exitCode: 137, reason: "OutOfMemoryError: Container killed due to memory usage" },
      statusReason: "Essential container in task exited",
    },
  ],
  container: { exitCode: 137, reason: "OutOfMemoryError: Container killed due to memory usage" },
});
const pull = failedJob({
  statusReason: "Task failed to start",
  attempts: [
    {
      container: {
        reason:
          "CannotPullContainerError: pull image manifest has been retried 5 time(s): failed to resolve ref 123456789012.dkr.ecr.us-east-1.amazonaws.com/cdk-hnb659fds-container-assets:abc: not found",
      },
      statusReason: "Task failed to start",
    },
  ],
});
const spot = failedJob({
  statusReason: "Host EC2 (instance i-0abc) terminated.",
  attempts: [1, 2, 3].map((n) => ({ container: {}, statusReason: `Host EC2 (instance i-0abc${n}) terminated.` })),
});
const cancelled = failedJob({ statusReason: "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY", attempts: [] });

describe("AWS's reason in plain words", () => {
  it("names an out-of-memory kill, an image that cannot be pulled, exhausted Spot retries and a job cancelled while waiting for capacity", () => {
    expect(plainReason(oom)).toMatch(/^out of memory \(exit 137\).*\(AWS Batch: Essential container in task exited; OutOfMemoryError/);
    expect(plainReason(pull)).toMatch(/^image could not be pulled.*CannotPullContainerError/);
    expect(plainReason(spot)).toMatch(/^Spot capacity reclaimed, retries exhausted \(3 attempts\)/);
    expect(plainReason(cancelled)).toMatch(
      /^cancelled while waiting for capacity.*G-instance quota of 0.*\(AWS Batch: CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY\)/,
    );
    expect(plainReason(failedJob({ statusReason: "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT" }))).toMatch(/no allowed instance type/);
    expect(plainReason(failedJob({ statusReason: "Job attempt duration exceeded timeout", attempts: [{ statusReason: "x" }] }))).toMatch(/^timed out/);
    expect(
      plainReason(failedJob({ statusReason: "Your Spot Task was interrupted.", attempts: [{ statusReason: "Your Spot Task was interrupted." }] })),
    ).toMatch(/^Spot capacity reclaimed, retries exhausted \(1 attempt\)/);
    // The job's own failure (exit 1 after it wrote its record): still a sentence, never the raw event.
    expect(plainReason(failedJob({ statusReason: "Essential container in task exited", attempts: [{ container: { exitCode: 1 } }] }))).toMatch(
      /exited with code 1/,
    );
  });

  it("finds the dataset in the job's parameters (a name, or the manifest key the upload rule passes); a nightly sweep (*) and other states have none", () => {
    expect(failureOf(oom)).toMatchObject({ dataset: "pets", jobId: oom.jobId, reason: plainReason(oom) });
    expect(failureOf({ ...oom, parameters: { dataset: "datasets/pets/manifest.json" } })?.dataset).toBe("pets");
    expect(failureOf({ ...oom, parameters: { dataset: "*" } })).toBeUndefined();
    expect(failureOf({ ...oom, status: "RUNNABLE" })).toBeUndefined();
  });
});

describe("the status record, through the Lambda's handler on a real S3 API", () => {
  let s3: LocalS3;
  const saved = { ...process.env };
  beforeAll(async () => {
    s3 = await startLocalS3({ bucket: "failures" });
    const env = { EDGETUNE_BUCKET: s3.config.bucket, EDGETUNE_S3_ENDPOINT: s3.endpoint, AWS_ACCESS_KEY_ID: "local", AWS_SECRET_ACCESS_KEY: "local-secret" };
    Object.assign(process.env, env);
  });
  afterAll(async () => {
    process.env = saved;
    await s3?.stop();
  });
  const put = (record: RunStatus) => s3.store.put(keys.runStatus(record.dataset, record.runId), JSON.stringify(record));
  const now = new Date().toISOString();
  const base = { schemaVersion: 1 as const, startedAt: now, updatedAt: now };

  it("marks the run the job was running failed and frees its lock; `status` and `push --wait` show it; the same event twice changes nothing", async () => {
    await put({ ...base, runId: "20261206T010000000Z-aaaaaa", dataset: "pets", state: "running", phase: "features", jobId: oom.jobId });
    await put({ ...base, runId: "20261206T005900000Z-bbbbbb", dataset: "pets", state: "running", jobId: "another-job" });
    await s3.store.put(keys.lock("pets"), JSON.stringify({ owner: `${oom.jobId}#1:uuid`, beatAt: Date.now() }));
    expect(await handler({ detail: oom })).toEqual({ failed: ["pets/20261206T010000000Z-aaaaaa"], freedLocks: ["pets"] });
    // EventBridge delivers at least once: the ended record is left alone, nothing is added.
    expect(await handler({ detail: oom })).toEqual({ failed: [], freedLocks: [] });
    expect(await handler({ detail: { ...oom, parameters: { dataset: "*" } } })).toEqual({ failed: [], freedLocks: [] });
    const [newest, other] = await listRunStatuses(s3.store, "pets");
    expect(newest).toMatchObject({ state: "failed", reason: expect.stringMatching(/^out of memory \(exit 137\).* \(during features\)$/) });
    expect(other).toMatchObject({ state: "running", jobId: "another-job" }); // another job's run is not touched
    expect(await s3.store.get(keys.lock("pets"))).toBeNull();
    // `push --wait` follows the record to its end: failed, with the reason.
    const followed = await followRun(s3.store, "pets", base.startedAt, () => {}, { pollMs: 10, timeoutMs: 5000 });
    expect(followed).toMatchObject({ state: "failed", reason: newest?.reason });
  });

  it("closes an upload's queued record that no job took over (the image could not be pulled), else writes a record of its own", async () => {
    await put({ ...base, runId: "20261206T010000000Z-cccccc", dataset: "cats", state: "queued" });
    expect((await handler({ detail: { ...pull, parameters: { dataset: "cats" } } })).failed).toEqual(["cats/20261206T010000000Z-cccccc"]);
    expect((await listRunStatuses(s3.store, "cats"))[0]).toMatchObject({
      state: "failed",
      jobId: pull.jobId,
      reason: expect.stringMatching(/^image could not be pulled/),
    });
    // A nightly run with no record yet, cancelled in RUNNABLE (a manifest key as parameter): a new failed record.
    const { failed } = await handler({ detail: { ...cancelled, parameters: { dataset: "datasets/dogs/manifest.json" } } });
    expect(failed).toEqual([expect.stringMatching(/^dogs\//)]);
    expect(await listRunStatuses(s3.store, "dogs")).toEqual([
      expect.objectContaining({ state: "failed", jobId: cancelled.jobId, reason: expect.stringMatching(/^cancelled while waiting for capacity/) }),
    ]);
  });
});
