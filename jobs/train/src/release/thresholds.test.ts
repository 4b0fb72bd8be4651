import { describe, expect, it } from "vitest";
import { decide } from "#shared/answer.ts";
import { EdgetuneError } from "#shared/errors.ts";
import { answeredMetrics, labelThresholds, parseThresholdPolicy } from "./thresholds.ts";

const p = (...v: number[]) => Float32Array.from(v);

describe("per-label thresholds", () => {
  // Label "cat" (0) answered 5 times: scores 0.95 ✓, 0.9 ✓, 0.8 ✗, 0.7 ✓, 0.6 ✗; a sixth cat is answered "dog".
  const labels = ["cat", "dog"];
  const probs = [p(0.95, 0.05), p(0.9, 0.1), p(0.8, 0.2), p(0.7, 0.3), p(0.6, 0.4), p(0.3, 0.7), p(0.1, 0.9)];
  const truth = [0, 0, 1, 0, 1, 0, 1];

  it("takes each label's best-F1 threshold by default", () => {
    const t = labelThresholds(labels, probs, truth, parseThresholdPolicy("f1"), undefined);
    // Keeping ≥ 0.7: P 3/4, R 3/4, F1 0.75 — better than ≥ 0.9 (P 1, R 1/2, F1 0.667) or ≥ 0.6 (P 3/5, R 3/4, F1 0.667).
    expect(t.cat).toEqual({ threshold: expect.closeTo(0.7, 6), precision: 0.75, recall: 0.75, reached: true });
  });

  it("takes the lowest threshold reaching a precision target", () => {
    const t = labelThresholds(labels, probs, truth, parseThresholdPolicy("precision:0.95"), undefined);
    expect(t.cat).toMatchObject({ threshold: expect.closeTo(0.9, 6), precision: 1, recall: 0.5, reached: true });
    // dog's only answers: 0.7 ✗ (a cat), 0.9 ✓ → precision 1 at 0.9.
    expect(t.dog?.threshold).toBeCloseTo(0.9, 6);
  });

  it("says when a precision target cannot be reached", () => {
    const t = labelThresholds(["a", "b"], [p(0.9, 0.1), p(0.8, 0.2)], [1, 0], parseThresholdPolicy("precision:0.9"), undefined);
    expect(t.a?.reached).toBe(false);
  });

  it("gives the rejection class no threshold", () => {
    const t = labelThresholds(["a", "b", "_none"], [p(0.1, 0.1, 0.8), p(0.8, 0.1, 0.1)], [2, 0], parseThresholdPolicy("f1"), 2);
    expect(Object.keys(t)).toEqual(["a", "b"]);
  });

  it("refuses a policy it does not know, in plain words", () => {
    expect(() => parseThresholdPolicy("recall:0.9")).toThrow(EdgetuneError);
    expect(() => parseThresholdPolicy("precision:1.5")).toThrow(/Valid values: f1, precision:0.95/);
    expect(parseThresholdPolicy("precision:0.95")).toEqual({ kind: "precision", target: 0.95 });
  });

  it("measures the answered share and accuracy with thresholds from the other folds", () => {
    const m = answeredMetrics(labels, probs, truth, parseThresholdPolicy("f1"), undefined, 42, 2);
    expect(m.answered + m.unsure + m.none).toBeCloseTo(1, 9);
    expect(m.none).toBe(0);
    expect(m.answered).toBeLessThan(1);
  });
});

describe("decide", () => {
  const labels = ["cat", "dog", "_none"];
  it("answers a label at or above its threshold, unsure below, none when the rejection class wins", () => {
    expect(decide([0.7, 0.2, 0.1], labels, { cat: 0.7, dog: 0.5 }, 2)).toEqual({ kind: "label", index: 0 });
    expect(decide([0.6, 0.3, 0.1], labels, { cat: 0.7, dog: 0.5 }, 2)).toEqual({ kind: "unsure", index: 0 });
    expect(decide([0.3, 0.2, 0.5], labels, { cat: 0.7, dog: 0.5 }, 2)).toEqual({ kind: "none", index: 2, by: "class" });
    // One number for every label (the API's ?threshold=) overrides the per-label ones.
    expect(decide([0.6, 0.3, 0.1], labels, 0.5, 2)).toEqual({ kind: "label", index: 0 });
    // Without thresholds (versions trained before them) every answer is a label.
    expect(decide([0.4, 0.35, 0.25], labels, {})).toEqual({ kind: "label", index: 0 });
  });
});

describe("answered metrics with a none-of-these class", () => {
  it("counts the labels' images for the answered share and the negatives apart", () => {
    const labels = ["_none", "cat", "dog"];
    const p = (...v: number[]) => Float32Array.from(v);
    // 4 negatives, 3 rejected; 4 cats and 4 dogs, all answered right with high scores.
    const probs = [
      p(0.9, 0.05, 0.05),
      p(0.8, 0.1, 0.1),
      p(0.7, 0.2, 0.1),
      p(0.1, 0.8, 0.1),
      ...[0, 1, 2, 3].map(() => p(0.02, 0.95, 0.03)),
      ...[0, 1, 2, 3].map(() => p(0.02, 0.03, 0.95)),
    ];
    const truth = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2];
    const m = answeredMetrics(labels, probs, truth, parseThresholdPolicy("f1"), 0, 42, 4);
    expect(m.answered).toBe(1);
    expect(m.answeredAccuracy).toBe(1);
    expect(m.none).toBe(0);
    expect(m.negativesRejected).toBeGreaterThanOrEqual(0.75);
  });
});
