import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import { keys } from "../../../../shared/keys.ts";
import { acquireLock, LockTimeoutError } from "./lock.ts";

let s3: LocalS3;
beforeAll(async () => {
  s3 = await startLocalS3({ bucket: "locks" });
});
afterAll(async () => {
  await s3?.stop();
});
afterEach(() => {
  delete process.env.AWS_BATCH_JOB_ID;
  delete process.env.AWS_BATCH_JOB_ATTEMPT;
});

describe("training lock", () => {
  it("makes a second run wait, and lets Batch's retry of the same job take over at once", async () => {
    // A live lock of another run (fresh heartbeat): a different job waits, and gives up with a message.
    const fresh = () => JSON.stringify({ owner: `job-1#1:${"x".repeat(8)}`, beatAt: Date.now() });
    await s3.store.put(keys.lock("m"), fresh());
    process.env.AWS_BATCH_JOB_ID = "job-2";
    await expect(acquireLock(s3.store, "m", { waitMs: 500 })).rejects.toBeInstanceOf(LockTimeoutError);
    // The same job's next attempt (the host was reclaimed mid-run): no waiting for the heartbeat to go stale.
    await s3.store.put(keys.lock("m"), fresh());
    process.env.AWS_BATCH_JOB_ID = "job-1";
    process.env.AWS_BATCH_JOB_ATTEMPT = "2";
    const lock = await acquireLock(s3.store, "m", { waitMs: 500 });
    const held = JSON.parse(new TextDecoder().decode((await s3.store.get(keys.lock("m"))) as Uint8Array)) as { owner: string };
    expect(held.owner).toMatch(/^job-1#2:/);
    await lock.release();
    expect(await s3.store.get(keys.lock("m"))).toBeNull();
  });
});
