import { EdgetuneError } from "#shared/errors.ts";
import { type ObjectStore, ObjectTooLargeError } from "#shared/s3/store.ts";

/**
 * One night's allowance for reading `captures/`, which the edge's key may fill with anything: every GET,
 * HEAD and listed page counts, valid file or not, and every byte read, until a deadline. Bounds per file
 * (size, parse) say nothing about how many files there are; this bounds the sum, so a million forged
 * ten-byte files cost the dispatcher at most this much, every night, and never its training.
 */
export interface ReadLimits {
  /** GETs and HEADs, and listed pages of 1 000 keys. */
  requests: number;
  bytes: number;
  /** Wall-clock milliseconds from the budget's creation. */
  milliseconds: number;
}

/** A night of real traffic is far below these: a roll-up per version and day, the last day's deltas, the decisions made. */
export const NIGHTLY_READ_LIMITS: ReadLimits = { requests: 50_000, bytes: 256 * 1024 * 1024, milliseconds: 10 * 60_000 };

export class ReadBudgetExhausted extends EdgetuneError {
  constructor(limits: ReadLimits, what: string) {
    super(
      "read_budget_exhausted",
      `tonight's reading of captures/ stopped at its limit (${what}; at most ${limits.requests} requests, ${limits.bytes} bytes, ${limits.milliseconds / 60_000} minutes): the rest waits for the next night`,
    );
  }
}

export class ReadBudget {
  readonly limits: ReadLimits;
  requests = 0;
  bytes = 0;
  private readonly deadline: number;
  private readonly now: () => number;

  constructor(limits: ReadLimits = NIGHTLY_READ_LIMITS, now: () => number = Date.now) {
    this.limits = limits;
    this.now = now;
    this.deadline = now() + limits.milliseconds;
  }

  /** Counts what is about to be (or was just) read; throws once any limit is passed. */
  spend(requests: number, bytes = 0): void {
    this.requests += requests;
    this.bytes += bytes;
    if (this.requests > this.limits.requests) throw new ReadBudgetExhausted(this.limits, `${this.requests} requests`);
    if (this.bytes > this.limits.bytes) throw new ReadBudgetExhausted(this.limits, `${this.bytes} bytes`);
    if (this.now() > this.deadline) throw new ReadBudgetExhausted(this.limits, "time");
  }

  /** Bytes still allowed: a capped read never asks for more. */
  get bytesLeft(): number {
    return Math.max(0, this.limits.bytes - this.bytes);
  }
}

/** `store` with every read charged to `budget` (writes and deletes are the job's own, not counted). */
export function budgeted(store: ObjectStore, budget: ReadBudget): ObjectStore {
  async function* pages<T>(items: AsyncIterable<T>): AsyncIterable<T> {
    let n = 0;
    for await (const item of items) {
      if (n++ % 1000 === 0) budget.spend(1);
      yield item;
    }
  }
  return {
    async get(key, options = {}) {
      budget.spend(1);
      // Never more than what is left tonight: a file that would pass the limit ends the night's reading
      // (it is not "too large" for its kind, so its caller must not treat it as forged).
      const left = budget.bytesLeft;
      const byBudget = left < (options.maxBytes ?? Number.POSITIVE_INFINITY);
      const bytes = await store.get(key, byBudget ? { maxBytes: left } : options).catch((e: unknown) => {
        if (byBudget && e instanceof ObjectTooLargeError) throw new ReadBudgetExhausted(budget.limits, `${budget.bytes} bytes and ${key}`);
        throw e;
      });
      budget.spend(0, bytes?.length ?? 0);
      return bytes;
    },
    async head(key) {
      budget.spend(1);
      return store.head(key);
    },
    list: (prefix) => pages(store.list(prefix)),
    listFolders: (prefix, options) => pages(store.listFolders(prefix, options)),
    put: (k, b, t, m) => store.put(k, b, t, m),
    putIfAbsent: (k, b, t) => store.putIfAbsent(k, b, t),
    putIfMatch: (k, b, e, t) => store.putIfMatch(k, b, e, t),
    delete: (k) => store.delete(k),
    deleteIfMatch: (k, e) => store.deleteIfMatch(k, e),
  };
}
