import { randomUUID } from "node:crypto";
import { EdgetuneError } from "#shared/errors.ts";
import { keys } from "#shared/keys.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import { jobIdFromEnv } from "../status.ts";

/**
 * One training run per model at a time: `locks/<model>.json` holds an owner token and a heartbeat.
 * A second run of the same trigger (S3 events can arrive twice) waits for the first and then finds
 * its version written. A run killed by a spot reclaim stops beating; Batch's retry of the same job
 * (same job id, a later attempt) takes the lock over at once, anyone else after three missed heartbeats.
 * Taking the lock is a conditional write where S3 supports it, then a read-back after a short pause
 * (last writer wins), which also covers S3-compatible servers that ignore conditional writes.
 * Releasing is a conditional delete (If-Match on the ETag of the version read), so a lock another run
 * took over between the read and the delete is left alone.
 * The heartbeat is once a minute: every beat is a new object version in the versioned bucket (60 an
 * hour, expired a day later by the bucket's lifecycle), not one every 15 s.
 */
export interface Lock {
  release(): Promise<void>;
}

export class LockTimeoutError extends EdgetuneError {
  constructor(name: string) {
    super("lock_timeout", `Another training run of ${name} is still going; try again later.`);
  }
}

const beatMs = () => Number(process.env.EDGETUNE_LOCK_HEARTBEAT_MS) || 60_000;

interface LockBody {
  owner: string;
  beatAt: number;
}

export async function acquireLock(store: ObjectStore, name: string, options: { waitMs?: number } = {}): Promise<Lock> {
  const key = keys.lock(name);
  const job = jobIdFromEnv();
  const owner = `${job ?? "local"}#${process.env.AWS_BATCH_JOB_ATTEMPT ?? "1"}:${randomUUID()}`;
  // A lock held by an earlier attempt of this very job: Batch starts an attempt only after the last one
  // ended (a spot reclaim), so nobody holds it any more.
  const earlierAttempt = (holder: LockBody) => job !== undefined && holder.owner.startsWith(`${job}#`) && holder.owner !== owner;
  // A waiting run gives up (with a message) before Batch would kill it at its own timeout: the stack
  // sets EDGETUNE_LOCK_WAIT_MS below the job timeout.
  const deadline = Date.now() + (options.waitMs ?? (Number(process.env.EDGETUNE_LOCK_WAIT_MS) || 3 * 60 * 60 * 1000));
  const body = () => JSON.stringify({ owner, beatAt: Date.now() } satisfies LockBody);
  for (;;) {
    const current = await read(store, key);
    const stale = !current || Date.now() - current.beatAt > 3 * beatMs() || earlierAttempt(current);
    if (stale) {
      if (current) await store.put(key, body(), "application/json");
      else await store.putIfAbsent(key, body(), "application/json");
      await new Promise((r) => setTimeout(r, Math.min(250, beatMs())));
      if ((await read(store, key))?.owner === owner) break;
    }
    if (Date.now() > deadline) throw new LockTimeoutError(name);
    await new Promise((r) => setTimeout(r, Math.min(beatMs(), 2000)));
  }
  const timer = setInterval(() => void store.put(key, body(), "application/json").catch(() => {}), beatMs());
  timer.unref();
  return {
    async release() {
      clearInterval(timer);
      await deleteIfHeldBy(store, key, (holder) => holder.owner === owner);
    },
  };
}

/**
 * Deletes the locks a dead job still holds (owner `<jobId>#…`), so the next run of its model starts at
 * once instead of waiting three heartbeats. Another run's lock is left alone. Returns the models freed.
 */
export async function releaseLocksOfJob(store: ObjectStore, jobId: string): Promise<string[]> {
  const freed: string[] = [];
  for await (const o of store.list(keys.locksRoot)) {
    if (!o.key.endsWith(".json")) continue;
    if (!(await deleteIfHeldBy(store, o.key, (holder) => holder.owner.startsWith(`${jobId}#`)))) continue;
    freed.push(o.key.slice(keys.locksRoot.length, -".json".length));
  }
  return freed;
}

/**
 * Deletes the lock at `key` only if `held` says its holder is the one to free, and only that version of
 * it: the ETag is taken before the body is read, and the delete is conditional on it. A lock rewritten in
 * between (taken over, or a heartbeat) makes the delete fail (412) instead of deleting someone else's.
 */
async function deleteIfHeldBy(store: ObjectStore, key: string, held: (holder: LockBody) => boolean): Promise<boolean> {
  const version = await store.head(key);
  if (!version) return false;
  const holder = await read(store, key);
  if (!holder || !held(holder)) return false;
  return store.deleteIfMatch(key, version.etag);
}

async function read(store: ObjectStore, key: string): Promise<LockBody | null> {
  const bytes = await store.get(key);
  if (!bytes) return null;
  try {
    return JSON.parse(new TextDecoder().decode(bytes)) as LockBody;
  } catch {
    return null;
  }
}
