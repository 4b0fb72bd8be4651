import pLimit, { type LimitFunction } from "p-limit";
import { ApiError } from "./errors.ts";

/**
 * Admission control for one isolate: 128 MB, shared by all of its concurrent requests. A classify
 * holds a place from before its body is read until its answer is computed; at most `concurrent` hold
 * one (each may hold a body of up to MAX_IMAGE_BYTES), at most `queued` wait for one (holding nothing
 * but their connection), and beyond that a request is refused at once — 503 with Retry-After, before
 * any of its body is read (or after waiting 20 s). Decoding and inference, which need the most memory and all of the CPU, run
 * one at a time (`exclusive`): an isolate runs one inference at a time anyway.
 */
export interface Admission {
  admit<T>(work: () => Promise<T>): Promise<T>;
  exclusive<T>(work: () => Promise<T>): Promise<T>;
  /**
   * True when no request waits for a place or for the compute slot. (The slot's current holder is not
   * counted: a caller in the same tick as a classification that just finished still sees it held.)
   */
  idle(): boolean;
  /** Requests holding a place, and waiting for one (for /healthz). */
  stats(): { active: number; queued: number };
}

/** How long a request may wait for a place before it is answered 503. */
const MAX_WAIT_MS = 20_000;

export function createAdmission(options: { concurrent: number; queued: number }): Admission {
  const places = pLimit(options.concurrent);
  const compute = pLimit(1);
  // Requests waiting now. p-limit's own pending count also keeps those that gave up (their entries
  // leave its queue only when a place frees), which would refuse new requests for nothing.
  let waiting = 0;
  return {
    async admit(work) {
      if (places.activeCount >= options.concurrent && waiting >= options.queued) throw busy();
      waiting++;
      let counted = true;
      const done = () => {
        if (counted) waiting--;
        counted = false;
      };
      return within(places, work, MAX_WAIT_MS, done);
    },
    exclusive: (work) => within(compute, work, MAX_WAIT_MS),
    idle: () => waiting === 0 && compute.pendingCount === 0,
    stats: () => ({ active: places.activeCount, queued: waiting }),
  };
}

/**
 * Runs `work` once `limit` has a place for it, in the calling request's own context, or fails with
 * 503 after `maxWaitMs`. Two workerd rules shape this: I/O (reading this request's body) may not be
 * done on behalf of another request, and p-limit starts queued work from whichever request frees a
 * place — so the queue only resolves a promise of this request's own; and a request that waits on
 * nothing of its own is cancelled as hung — so the wait also has its own timer, which is the bound
 * on how long a request waits in the queue.
 */
async function within<T>(limit: LimitFunction, work: () => Promise<T>, maxWaitMs: number, stoppedWaiting: () => void = () => {}): Promise<T> {
  let leave = () => {};
  const held = new Promise<void>((resolve) => {
    leave = resolve;
  });
  let settle = (_entered: boolean) => {};
  const waited = new Promise<boolean>((resolve) => {
    settle = resolve;
  });
  const timer = setTimeout(() => settle(false), maxWaitMs);
  void limit(() => {
    settle(true);
    return held; // resolved already if this request gave up waiting: the place is free at once
  });
  const entered = await waited;
  clearTimeout(timer);
  stoppedWaiting();
  try {
    if (!entered) throw busy();
    return await work();
  } finally {
    leave();
  }
}

const busy = () => new ApiError(503, "busy", "This instance is busy with other images; retry in a second.", { "retry-after": "1" });
