import { pMapIterable } from "p-map";
import { describe, expect, it } from "vitest";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * What the pipeline relies on from p-map's pMapIterable (image fetches, pack reads, uploads, the local
 * fan-out): results in input order, a bounded number in flight, and a failure thrown at its turn, after
 * the results before it, never left unhandled. Pinned here so an upgrade that changes it fails loudly.
 */
describe("pMapIterable", () => {
  it("yields in order, never runs more than the limit at once, and runs everything", async () => {
    let running = 0;
    let peak = 0;
    const out: number[] = [];
    for await (const v of pMapIterable(
      [30, 5, 20, 1, 10, 2, 8],
      async (ms, i) => {
        running++;
        peak = Math.max(peak, running);
        await sleep(ms);
        running--;
        return i;
      },
      { concurrency: 3 },
    ))
      out.push(v);
    expect(out).toEqual([0, 1, 2, 3, 4, 5, 6]);
    expect(peak).toBe(3);
  });

  it("throws a failure at its turn, after the results before it", async () => {
    const out: number[] = [];
    const run = async () => {
      for await (const v of pMapIterable(
        [1, 2, 3],
        async (x) => {
          if (x === 2) throw new Error("boom");
          await sleep(5);
          return x;
        },
        { concurrency: 3 },
      ))
        out.push(v);
    };
    await expect(run()).rejects.toThrow("boom");
    expect(out).toEqual([1]);
  });
});
