import { describe, expect, it } from "vitest";
import { evaluate } from "./evaluate.ts";

describe("evaluate", () => {
  it("computes accuracy, per-class metrics, confusion and confident mistakes", () => {
    const p = (a: number, b: number, c: number) => Float32Array.from([a, b, c]);
    const result = evaluate(
      ["ant", "bee", "wasp"],
      [0, 0, 1, 1, 2],
      [p(0.9, 0.05, 0.05), p(0.2, 0.7, 0.1), p(0.1, 0.8, 0.1), p(0.1, 0.3, 0.6), p(0, 0, 1)],
      ["a1", "a2", "b1", "b2", "w1"],
    );
    expect(result.metrics.accuracy).toBeCloseTo(3 / 5);
    expect(result.confusion).toEqual([
      [1, 1, 0],
      [0, 1, 1],
      [0, 0, 1],
    ]);
    expect(result.metrics.perClass.bee).toEqual({ precision: 0.5, recall: 0.5, f1: 0.5, support: 2 });
    expect(result.metrics.perClass.wasp?.precision).toBeCloseTo(0.5);
    expect(result.mistakes.map((m) => m.key)).toEqual(["a2", "b2"]);
    expect(result.mistakes[0]).toMatchObject({ label: "ant", predicted: "bee" });
    // Every held-out image's top score, ascending (float32 as computed): what the monitor counts exactly.
    expect(result.topScores).toEqual([0.6, 0.7, 0.8, 0.9, 1].map((x) => Math.fround(x)));
  });
});
