import { describe, expect, it } from "vitest";
import { answer, decide } from "./answer.ts";
import { validMetadata } from "./contracts/fixtures.ts";
import { ClassMeans, classMeansBytes, readClassMeans, similarity, similarityFloor, versionClassMeans } from "./novelty.ts";

/** Reference: cosine similarity in float64, the textbook way. */
const cosine = (a: number[], b: number[]) => {
  const dot = a.reduce((s, x, i) => s + x * (b[i] as number), 0);
  const n = (v: number[]) => Math.sqrt(v.reduce((s, x) => s + x * x, 0));
  return dot / (n(a) * n(b));
};

describe("novelty rule", () => {
  const rows: [number[], number][] = [
    [[1, 0, 0], 0],
    [[2, 0.2, 0], 0], // longer: counts as much as the first (each row normalised)
    [[0, 1, 1], 1],
    [[9, 9, 9], 2], // the rejection class: not a label, no direction
  ];

  it("a label's direction is the normalised mean of its rows' unit vectors; rows of other classes are ignored", () => {
    const acc = new ClassMeans([0, 1], 3);
    for (const [f, c] of rows) acc.add(f, c);
    expect(acc.support).toEqual([2, 1]);
    const means = acc.means();
    const unit = (v: number[]) => v.map((x) => x / Math.hypot(...v));
    const mean0 = unit([1, 0, 0]).map((x, i) => x + (unit([2, 0.2, 0])[i] as number));
    expect(Array.from(means.subarray(0, 3))).toEqual(unit(mean0).map((x) => expect.closeTo(x, 6)));
    expect(Array.from(means.subarray(3, 6))).toEqual(unit([0, 1, 1]).map((x) => expect.closeTo(x, 6)));
  });

  it("similarity is the cosine to the nearest direction, as the textbook computes it", () => {
    const acc = new ClassMeans([0, 1], 3);
    for (const [f, c] of rows) acc.add(f, c);
    const means = acc.means();
    const dirs = [Array.from(means.subarray(0, 3)), Array.from(means.subarray(3, 6))];
    for (const f of [
      [1, 2, 3],
      [-1, 0.5, 0],
      [0.1, 0.1, -4],
    ])
      expect(similarity(f, means)).toBeCloseTo(Math.max(...dirs.map((d) => cosine(f, d))), 6);
    // Scale does not matter; a zero vector is like nothing.
    expect(similarity([10, 20, 30], means)).toBeCloseTo(similarity([1, 2, 3], means), 6);
    expect(similarity([0, 0, 0], means)).toBe(0);
    expect(similarity([Number.NaN, 0, 0], means)).toBe(-1);
    // Float32 rounding never says more than 1, or a floor fitted on such images would break the metadata.
    expect(similarity(Array.from(means.subarray(0, 3)), means)).toBeLessThanOrEqual(1);
  });

  it("the floor rejects the asked share of held-out similarities; 0 turns it off", () => {
    const heldOut = Array.from({ length: 100 }, (_, i) => i / 100);
    const floor = similarityFloor(heldOut, 0.05);
    expect(heldOut.filter((v) => v < floor)).toHaveLength(5);
    expect(similarityFloor(heldOut, 0)).toBe(-1);
    // Fewer than 1 / reject images: the floor is the least similar held-out image, which it keeps (nothing
    // of the labels' own is refused; only what is less like them than all of it).
    const few = [0.7, 0.4, 0.9, 0.55];
    expect(similarityFloor(few, 0.05)).toBe(0.4);
    expect(few.filter((v) => v < similarityFloor(few, 0.05))).toEqual([]);
    expect(similarityFloor([], 0.05)).toBe(-1);
  });

  it("the file round-trips, and a file of another size or with a non-number is refused", () => {
    const means = Float32Array.from([0.6, 0.8, 0, 1]);
    expect(Array.from(readClassMeans(classMeansBytes(means), 2, 2))).toEqual(Array.from(means));
    expect(() => readClassMeans(classMeansBytes(means), 2, 3)).toThrow(/16 bytes, not the 2 × 3 float32/);
    expect(() => readClassMeans(classMeansBytes(Float32Array.from([Number.NaN, 0, 0, 1])), 2, 2)).toThrow(/not a finite number/);
    // From a version's files: nothing without a floor; a floor without its file is refused, not ignored.
    const novelty = { rows: 2, features: 2 };
    expect(versionClassMeans({}, new Map())).toBeUndefined();
    expect(Array.from(versionClassMeans({ novelty }, new Map([["class-means.bin", classMeansBytes(means)]])) ?? [])).toEqual(Array.from(means));
    expect(() => versionClassMeans({ novelty }, new Map())).toThrow(/no class-means.bin/);
  });

  it("answer: says which rule made it none of these, and gives the similarity and the floor", () => {
    const m = {
      ...validMetadata(),
      thresholds: { policy: "f1", byLabel: { cat: 0.5, dog: 0.5 } },
      novelty: { method: "cosine-class-mean", rows: 2, features: 3, floor: 0.3, heldOutRejected: 0.05 } as const,
    };
    const scores = Float32Array.of(0.9, 0.1);
    expect(answer({ scores, similarity: 0.1 }, m, { topK: 2 })).toMatchObject({
      label: null,
      none: true,
      noneBy: "novelty",
      similarity: 0.1,
      similarityFloor: 0.3,
    });
    const sure = answer({ scores, similarity: 0.8 }, m, { topK: 2 });
    expect(sure).toMatchObject({ label: "cat", none: false, similarity: 0.8 });
    expect(sure.noneBy).toBeUndefined();
    // The rejection class is checked first.
    const withNone = { ...m, labels: ["_none", "cat", "dog"], noneLabel: "_none" };
    expect(answer({ scores: Float32Array.of(0.8, 0.1, 0.1), similarity: 0.1 }, withNone, { topK: 2 })).toMatchObject({ none: true, noneBy: "class" });
  });

  it("decide: below the floor is none of these even for a confident label; at or above it the scores decide", () => {
    const labels = ["cat", "dog"];
    const scores = [0.97, 0.03];
    expect(decide(scores, labels, { cat: 0.5, dog: 0.5 }, undefined, { similarity: 0.2, floor: 0.3 })).toEqual({ kind: "none", index: 0, by: "novelty" });
    expect(decide(scores, labels, { cat: 0.5, dog: 0.5 }, undefined, { similarity: 0.3, floor: 0.3 })).toEqual({ kind: "label", index: 0 });
    expect(decide(scores, labels, { cat: 0.99, dog: 0.5 }, undefined, { similarity: 0.9, floor: 0.3 })).toEqual({ kind: "unsure", index: 0 });
  });
});
