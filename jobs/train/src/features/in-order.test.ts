import { describe, expect, it } from "vitest";
import { mapInOrder } from "./in-order.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("mapInOrder", () => {
  it("yields in order, never runs more than the limit at once, and runs everything", async () => {
    let running = 0;
    let peak = 0;
    const out: number[] = [];
    for await (const v of mapInOrder([30, 5, 20, 1, 10, 2, 8], 3, async (ms, i) => {
      running++;
      peak = Math.max(peak, running);
      await sleep(ms);
      running--;
      return i;
    }))
      out.push(v);
    expect(out).toEqual([0, 1, 2, 3, 4, 5, 6]);
    expect(peak).toBe(3);
  });

  it("throws a failure at its turn, after the results before it", async () => {
    const out: number[] = [];
    const run = async () => {
      for await (const v of mapInOrder([1, 2, 3], 3, async (x) => {
        if (x === 2) throw new Error("boom");
        await sleep(5);
        return x;
      }))
        out.push(v);
    };
    await expect(run()).rejects.toThrow("boom");
    expect(out).toEqual([1]);
  });
});
