import { execFile } from "node:child_process";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { jobEnvironment } from "../../infra/local/job-env.ts";
import { type LocalS3, startLocalS3 } from "../../infra/local/s3-server.ts";
import { uploadSample } from "../../test/support/datasets.ts";
import { sampleDataset } from "./src/dataset/sample.ts";
import { memoryLogger } from "./src/log.ts";
import { adoptQueued, followRun, listRunStatuses, type RunStatus, StatusRecorder } from "./src/status.ts";
import { train } from "./src/train.ts";

/** Runs you can follow: the status records a run writes, `edgetune status`, and `push`'s hand-over. */
const run = promisify(execFile);
let s3: LocalS3;
beforeAll(async () => {
  s3 = await startLocalS3({ bucket: "status" });
});
afterAll(async () => {
  await s3?.stop();
});
const cli = (args: string[]) =>
  run(process.execPath, ["jobs/train/cli.ts", ...args], { env: jobEnvironment(s3.config), timeout: 120_000 }).catch(
    (e: { code: number; stdout: string; stderr: string }) => ({ ...e, failed: e.code }),
  );

describe("run status", () => {
  it("a run records itself: running with its stages and progress, then done with the outcome and the report", async () => {
    await uploadSample(s3.store, "followed", { perLabel: 8 });
    const seen: RunStatus[] = [];
    const since = new Date().toISOString();
    const [final, result] = await Promise.all([
      followRun(s3.store, "followed", since, (s) => seen.push(s), { pollMs: 50, timeoutMs: 120_000 }),
      train(s3.store, { dataset: "followed", imageSize: 96, views: 1, head: { epochs: 3 }, promote: "always" }, memoryLogger()),
    ]);
    expect(final).toMatchObject({ state: "done", dataset: "followed", model: "followed", version: result.version, promoted: true });
    expect(seen.some((s) => s.state === "running" && s.phase !== undefined)).toBe(true);
    expect(await s3.store.head(final?.report as string)).not.toBeNull();
    const [newest] = await listRunStatuses(s3.store, "followed");
    expect(newest?.runId).toBe(final?.runId);
  }, 180_000);

  it("one queued record is adopted by one run only; a stale one by none", async () => {
    const queued = new StatusRecorder(s3.store, "twice", "queued");
    await queued.update({}, true);
    const [a, b] = await Promise.all([adoptQueued(s3.store, "twice"), adoptQueued(s3.store, "twice")]);
    expect([a, b].filter(Boolean)).toEqual([{ runId: queued.current.runId, startedAt: queued.current.startedAt }]);
    // Handed over to array jobs (queued again): the continuation may claim it once more.
    await queued.update({ state: "queued", handOvers: 1 }, true);
    expect(await adoptQueued(s3.store, "twice")).toMatchObject({ runId: queued.current.runId });
    expect(await adoptQueued(s3.store, "twice")).toBeUndefined();
    const then = new Date(Date.now() - 7 * 3600_000).toISOString();
    const stale: RunStatus = { schemaVersion: 1, runId: "20200101T000000000Z-abcdef", dataset: "stale", state: "queued", startedAt: then, updatedAt: then };
    await s3.store.put(`status/stale/${stale.runId}.json`, JSON.stringify(stale));
    expect(await adoptQueued(s3.store, "stale")).toBeUndefined();
  });

  it("a run that fails records the reason a user can act on", async () => {
    await expect(train(s3.store, { dataset: "never-pushed" }, memoryLogger())).rejects.toThrow(/has no manifest.json/);
    const [failed] = await listRunStatuses(s3.store, "never-pushed");
    expect(failed).toMatchObject({ state: "failed", dataset: "never-pushed" });
    expect(failed?.reason).toMatch(/has no manifest.json yet/);
  });

  it("edgetune status lists runs for people and for scripts; push records the queued run and says how to follow it", async () => {
    const table = await cli(["status"]);
    expect(table.stdout).toMatch(/followed\s+promoted followed v[0-9a-f]{12} \([\d.]+ %\): .*; report: models\/followed\/v[0-9a-f]{12}\/report\.html/);
    expect(table.stdout).toMatch(/never-pushed\s+failed: Dataset never-pushed has no manifest.json yet/);
    const json = (await cli(["status", "followed", "--json"])).stdout
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as RunStatus);
    expect(json[0]).toMatchObject({ dataset: "followed", state: "done" });
    expect((await cli(["status", "nobody"])).stderr).toMatch(/No runs of nobody yet/);

    const folder = await mkdtemp(join(tmpdir(), "edgetune-push-"));
    try {
      for (const i of await sampleDataset({ perLabel: 5, size: 64 })) {
        await mkdir(dirname(join(folder, i.file)), { recursive: true });
        await writeFile(join(folder, i.file), i.bytes);
      }
      const pushed = await cli(["push", folder, "--dataset", "pushed"]);
      expect(pushed.stdout).toMatch(
        /^Uploaded 15 images of pushed \(animals 5, food 5, travel 5\); training is triggered .* Follow it: edgetune status pushed --follow\n$/,
      );
      const [queued] = await listRunStatuses(s3.store, "pushed");
      expect(queued?.state).toBe("queued");
      // The run the push triggered (here called as the dispatcher would) takes the queued record over:
      // one run, one record, from push to end.
      await train(s3.store, { dataset: "pushed", imageSize: 96, views: 1, head: { epochs: 3 }, promote: "always" }, memoryLogger());
      const after = await listRunStatuses(s3.store, "pushed");
      expect(after).toHaveLength(1);
      expect(after[0]).toMatchObject({ runId: queued?.runId, startedAt: queued?.startedAt, state: "done", promoted: true });
      // Pushed again unchanged: the run finds its version trained and served; --wait exits 0, not 2.
      const again = cli(["push", folder, "--dataset", "pushed", "--wait", "--json"]);
      // The dispatcher would start the run when the manifest lands: here, once the push's record is there.
      for (let i = 0; i < 600 && (await listRunStatuses(s3.store, "pushed", 1))[0]?.state !== "queued"; i++) await new Promise((r) => setTimeout(r, 100));
      await train(s3.store, { dataset: "pushed", imageSize: 96, views: 1, head: { epochs: 3 }, promote: "always" }, memoryLogger());
      const waited = await again;
      expect("failed" in waited ? waited.failed : 0).toBe(0);
      const lines = waited.stdout
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l) as RunStatus & { uploaded?: number });
      expect(lines[0]).toMatchObject({ dataset: "pushed", state: "queued", uploaded: 15 });
      expect(lines.at(-1)).toMatchObject({ state: "done", unchanged: true, promoted: true });
      expect((await cli(["status", "pushed"])).stdout).toMatch(/pushed\s+already trained: pushed v[0-9a-f]{12} \(served\)/);
    } finally {
      await rm(folder, { recursive: true, force: true });
    }
  }, 180_000);
});
