import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { keys } from "#shared/keys.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import { acquireLock, LockTimeoutError, releaseLocksOfJob } from "./lock.ts";

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

  it("frees a dead job's lock, but not one another run took over between the read and the delete", async () => {
    const dead = JSON.stringify({ owner: "job-dead#1:x", beatAt: Date.now() });
    const takeover = JSON.stringify({ owner: "job-new#1:y", beatAt: Date.now() });
    await s3.store.put(keys.lock("raced"), dead);
    // Another run takes the lock over right after the dead job's lock is read (a real S3 write, in between).
    let raced = false;
    const racing: ObjectStore = Object.assign(Object.create(s3.store) as ObjectStore, {
      get: async (key: string) => {
        const bytes = await s3.store.get(key);
        if (key === keys.lock("raced") && !raced) {
          raced = true;
          await s3.store.put(key, takeover);
        }
        return bytes;
      },
    });
    expect(await releaseLocksOfJob(racing, "job-dead")).toEqual([]);
    expect(raced).toBe(true);
    expect(new TextDecoder().decode((await s3.store.get(keys.lock("raced"))) as Uint8Array)).toBe(takeover);
    // Without a race, the dead job's lock is freed (and only that job's).
    await s3.store.put(keys.lock("raced"), dead);
    expect(await releaseLocksOfJob(s3.store, "job-new")).toEqual([]);
    expect(await releaseLocksOfJob(s3.store, "job-dead")).toEqual(["raced"]);
    expect(await s3.store.get(keys.lock("raced"))).toBeNull();
  });

  it("the local S3 server deletes conditionally as S3 does (If-Match on DeleteObject)", async () => {
    const { etag } = await s3.store.put("locks/cond.json", "v1");
    await s3.store.put("locks/cond.json", "v2");
    expect(await s3.store.deleteIfMatch("locks/cond.json", etag)).toBe(false);
    expect(await s3.store.get("locks/cond.json")).not.toBeNull();
    const current = await s3.store.head("locks/cond.json");
    expect(await s3.store.deleteIfMatch("locks/cond.json", current?.etag as string)).toBe(true);
    expect(await s3.store.get("locks/cond.json")).toBeNull();
    expect(await s3.store.deleteIfMatch("locks/cond.json", current?.etag as string)).toBe(false);
  });
});
