import { type ChildProcess, spawn } from "node:child_process";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { keys } from "#shared/keys.ts";
import { Dispatcher } from "../infra/local/dispatcher.ts";
import { jobEnvironment } from "../infra/local/job-env.ts";
import { type LocalS3, startLocalS3 } from "../infra/local/s3-server.ts";
import { sampleDataset } from "../jobs/train/src/dataset/sample.ts";
import { listRunStatuses } from "../jobs/train/src/status.ts";

/**
 * The failure path on the local stack, as a user meets it: `push --wait` (the real CLI, a child
 * process) → the dispatcher runs the training job → the job is SIGKILLed mid-run (what the kernel's
 * OOM killer does) → the run is `failed` with the reason within seconds, `push --wait` exits 1 with it,
 * `status` shows it, and the next run takes the model's lock at once.
 */
let s3: LocalS3;
let dispatcher: Dispatcher;
let folder: string;
const heartbeat = process.env.EDGETUNE_LOCK_HEARTBEAT_MS;

beforeAll(async () => {
  s3 = await startLocalS3({ bucket: "killed-run" });
  // A lock left by the killed run would go stale only after three 10-minute heartbeats: far beyond this
  // test's timeout, so the second run finishes here only if the dead run's lock was released.
  process.env.EDGETUNE_LOCK_HEARTBEAT_MS = "600000";
  dispatcher = new Dispatcher({
    store: s3.store,
    s3: s3.config,
    pollMs: 200,
    trainArgs: ["--image-size", "96", "--views", "1", "--epochs", "5", "--promote", "always"],
    output: "collect",
  });
  dispatcher.start();
  folder = await mkdtemp(join(tmpdir(), "edgetune-killed-"));
  for (const i of await sampleDataset({ perLabel: 8, size: 96 })) {
    await mkdir(dirname(join(folder, i.file)), { recursive: true });
    await writeFile(join(folder, i.file), i.bytes);
  }
});
afterAll(async () => {
  await dispatcher?.stop();
  await s3?.stop();
  if (folder) await rm(folder, { recursive: true, force: true });
  if (heartbeat === undefined) delete process.env.EDGETUNE_LOCK_HEARTBEAT_MS;
  else process.env.EDGETUNE_LOCK_HEARTBEAT_MS = heartbeat;
});

/** The CLI as a user runs it; resolves with its exit code and output. */
function cli(args: string[]): { child: ChildProcess; done: Promise<{ code: number | null; stdout: string; stderr: string }> } {
  const child = spawn(process.execPath, ["jobs/train/cli.ts", ...args], { env: jobEnvironment(s3.config), stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout?.on("data", (d) => {
    stdout += d;
  });
  child.stderr?.on("data", (d) => {
    stderr += d;
  });
  return { child, done: new Promise((resolve) => child.once("exit", (code) => resolve({ code, stdout, stderr }))) };
}

async function until<T>(what: () => Promise<T | undefined> | T | undefined, timeoutMs: number, label: string): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await what();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${label}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe("a training process that dies", () => {
  it("leaves its run failed with the reason at once, push --wait exits 1, and the next run does not wait for the lock", async () => {
    const push = cli(["push", folder, "--dataset", "killme", "--wait"]);
    // Mid-run: the job holds the model's lock (it is past planning, training).
    const pid = await until(
      async () => {
        const job = dispatcher.jobs.at(-1);
        return job?.pid !== undefined && (await s3.store.head(keys.lock("killme"))) ? job.pid : undefined;
      },
      180_000,
      "the run to take its lock",
    );
    process.kill(pid, "SIGKILL");
    const killedAt = Date.now();

    const pushed = await push.done;
    const reportedAfterMs = Date.now() - killedAt;
    expect(pushed.code).toBe(1);
    expect(pushed.stdout).toMatch(/failed: the training process was killed \(SIGKILL\) — out of memory or stopped by hand/);
    // push --wait polls once a second; the dispatcher closes the run as soon as the child is gone.
    expect(reportedAfterMs).toBeLessThan(5_000);

    const [record] = await listRunStatuses(s3.store, "killme", 1);
    expect(record).toMatchObject({ state: "failed", jobId: dispatcher.jobs.at(-1)?.jobId });
    expect(record?.reason).toMatch(/^the training process was killed \(SIGKILL\)/);
    expect(await s3.store.get(keys.lock("killme"))).toBeNull();
    const status = await cli(["status", "killme"]).done;
    expect(status.stdout).toMatch(/failed: the training process was killed \(SIGKILL\)/);

    // The next run (the same folder pushed again) trains to the end without waiting for a stale lock.
    const again = await cli(["push", folder, "--dataset", "killme", "--wait"]).done;
    expect(again.code, again.stdout + again.stderr).toBe(0);
    expect((await listRunStatuses(s3.store, "killme", 1))[0]).toMatchObject({ state: "done", promoted: true });
  }, 400_000);
});
