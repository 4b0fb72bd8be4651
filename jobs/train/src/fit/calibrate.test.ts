import * as tf from "@tensorflow/tfjs";
import { describe, expect, it } from "vitest";
import { mulberry32 } from "../dataset/augment.ts";
import { calibrate, expectedCalibrationError, fitTemperature, foldTemperature, withTemperature } from "./calibrate.ts";
import { crossFitted, stratifiedFolds } from "./folds.ts";
import { DEFAULT_HEAD, headLayers } from "./head.ts";

/**
 * Held-out scores of a model that is right about 70 % of the time and says so with softmax(3·z): an
 * over-confident model whose honest temperature is 3 by construction.
 */
function overConfident(n: number, classes: number, seed: number): { probs: Float32Array[]; truth: number[] } {
  const rand = mulberry32(seed);
  const probs: Float32Array[] = [];
  const truth: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = i % classes;
    // z_c ~ N(μ·[c = t], σ²) with μ/σ² = 1: then P(t | z) = softmax(z) exactly, so softmax(z) is
    // calibrated and softmax(3z) over-confident by a temperature of 3.
    const z = Array.from({ length: classes }, (_, c) => (c === t ? 1.5 : 0) + Math.sqrt(1.5) * gaussian(rand));
    const sharp = z.map((v) => Math.exp(3 * v));
    const sum = sharp.reduce((a, b) => a + b, 0);
    probs.push(Float32Array.from(sharp, (v) => v / sum));
    truth.push(t);
  }
  return { probs, truth };
}
function gaussian(rand: () => number): number {
  return Math.sqrt(-2 * Math.log(rand() + 1e-12)) * Math.cos(2 * Math.PI * rand());
}

describe("temperature scaling", () => {
  it("recovers the temperature of an over-confident model and removes most of its calibration error", () => {
    const { probs, truth } = overConfident(3000, 4, 7);
    expect(fitTemperature(probs, truth)).toBeGreaterThan(2.6);
    expect(fitTemperature(probs, truth)).toBeLessThan(3.4);
    const c = calibrate(probs, truth, 42);
    expect(c.folds).toBe(5);
    expect(c.eceBefore).toBeGreaterThan(0.1);
    expect(c.eceAfter).toBeLessThan(0.03);
    // No argmax moves: accuracy is untouched.
    c.probs.forEach((p, i) => {
      const before = probs[i] as Float32Array;
      expect(p.indexOf(Math.max(...p))).toBe(before.indexOf(Math.max(...before)));
    });
  });

  it("leaves a calibrated model nearly alone", () => {
    const { probs, truth } = overConfident(3000, 4, 9);
    const honest = probs.map((p) => withTemperature(p, 3));
    expect(Math.abs(fitTemperature(honest, truth) - 1)).toBeLessThan(0.15);
    expect(expectedCalibrationError(honest, truth)).toBeLessThan(0.03);
  });

  it("scores every held-out row with a temperature fitted without it", () => {
    const truth = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1];
    const split = stratifiedFolds(truth, 5, 1);
    expect(split.folds).toBe(5);
    // Each fold holds one row of each label.
    for (let f = 0; f < 5; f++) expect(truth.filter((_, i) => split.foldOf[i] === f).sort()).toEqual([0, 1]);
    const seen = crossFitted(
      truth.length,
      split,
      (rows) => new Set(rows),
      (rows, i) => rows.has(i),
    );
    expect(seen).toEqual(new Array(truth.length).fill(false));
  });

  it("is folded into the head: the model's own scores become softmax(z / T)", async () => {
    const head = headLayers(3, { ...DEFAULT_HEAD, dropout: 0 });
    const input = tf.input({ shape: [4] });
    const model = tf.model({ inputs: input, outputs: head.reduce((t, l) => l.apply(t) as tf.SymbolicTensor, input) });
    const x = tf.tensor2d([
      [1, -2, 0.5, 3],
      [0, 1, -1, 2],
    ]);
    const before = (await (model.predict(x) as tf.Tensor).array()) as number[][];
    foldTemperature(head, 2.5);
    const after = (await (model.predict(x) as tf.Tensor).array()) as number[][];
    before.forEach((p, i) => {
      const expected = withTemperature(Float32Array.from(p), 2.5);
      for (const [c, v] of (after[i] as number[]).entries()) expect(v).toBeCloseTo(expected[c] as number, 5);
    });
    x.dispose();
    model.dispose();
  });
});

describe("temperature scaling, degenerate held-out splits", () => {
  it("keeps T = 1 when the held-out answers are all right (no evidence about confidence) or absent", () => {
    expect(fitTemperature([Float32Array.from([0.6, 0.4]), Float32Array.from([0.3, 0.7])], [0, 1])).toBe(1);
    expect(fitTemperature([], [])).toBe(1);
  });
});
