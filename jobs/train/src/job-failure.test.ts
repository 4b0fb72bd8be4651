import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { keys } from "#shared/keys.ts";
import { type LocalS3, startLocalS3 } from "../../../infra/local/s3-server.ts";
import { exitReason, failJob } from "./job-failure.ts";
import { listRunStatuses, StatusRecorder } from "./status.ts";

let s3: LocalS3;
beforeAll(async () => {
  s3 = await startLocalS3({ bucket: "job-failure" });
});
afterAll(async () => {
  await s3?.stop();
});

describe("exitReason", () => {
  it("names a signal, a container's 128 + n, or the exit code, and nothing for a clean exit", () => {
    const killed = "the training process was killed (SIGKILL) — out of memory or stopped by hand";
    expect(exitReason({ code: null, signal: "SIGKILL" })).toBe(killed);
    expect(exitReason({ code: 137 })).toBe(killed);
    expect(exitReason({ code: 143 })).toBe("the training process was stopped (SIGTERM)");
    expect(exitReason({ code: null, signal: "SIGSEGV" })).toBe("the training process crashed (SIGSEGV)");
    expect(exitReason({ code: 3 })).toBe("the training process exited with code 3");
    expect(exitReason({ code: 0 })).toBeUndefined();
  });
});

describe("failJob", () => {
  it("fails only the dead job's running records and frees only its locks", async () => {
    const mine = new StatusRecorder(s3.store, "a", "running", { jobId: "job-dead" });
    await mine.update({ phase: "features" }, true);
    const other = new StatusRecorder(s3.store, "b", "running", { jobId: "job-alive" });
    await other.update({}, true);
    await s3.store.put(keys.lock("a"), JSON.stringify({ owner: "job-dead#1:x", beatAt: Date.now() }));
    await s3.store.put(keys.lock("b"), JSON.stringify({ owner: "job-alive#1:y", beatAt: Date.now() }));

    const closed = await failJob(s3.store, { jobId: "job-dead" }, "the training process exited with code 3");
    expect(closed.freedLocks).toEqual(["a"]);
    expect(closed.runs.map((r) => r.runId)).toEqual([mine.current.runId]);
    expect((await listRunStatuses(s3.store, "a", 1))[0]).toMatchObject({
      state: "failed",
      reason: "the training process exited with code 3 (during features)",
      jobId: "job-dead",
    });
    expect((await listRunStatuses(s3.store, "b", 1))[0]?.state).toBe("running");
    expect(await s3.store.get(keys.lock("b"))).not.toBeNull();
  });

  it("a job that died before writing a record leaves one for its dataset (adopting the push's queued record)", async () => {
    const queued = new StatusRecorder(s3.store, "c", "queued");
    await queued.update({}, true);
    const closed = await failJob(s3.store, { jobId: "job-early", dataset: "c" }, "the training process exited with code 1");
    expect(closed.runs).toHaveLength(1);
    expect(await listRunStatuses(s3.store, "c")).toEqual([
      expect.objectContaining({ runId: queued.current.runId, state: "failed", jobId: "job-early", reason: "the training process exited with code 1" }),
    ]);
  });
});
