import * as tf from "@tensorflow/tfjs";
import { beforeAll, describe, expect, it } from "vitest";
import { mulberry32 } from "../dataset/augment.ts";
import { initBackend } from "../model/backend.ts";
import { applyLayers, DEFAULT_HEAD, headLayers, predictRows, trainModel } from "./head.ts";
import { memoryRows, type RowSource } from "./rows.ts";

beforeAll(async () => {
  await initBackend();
});

/** Two Gaussian clusters in 8 dimensions, one per class. */
function clusters(n: number, seed: number): RowSource {
  const rand = mulberry32(seed);
  const gauss = () => Math.sqrt(-2 * Math.log(rand() + 1e-12)) * Math.cos(2 * Math.PI * rand());
  const y = Int32Array.from({ length: n }, (_, i) => i % 2);
  const rows = Array.from(y, (c) => Float32Array.from({ length: 8 }, (_, d) => (d < 2 ? (c === 0 ? -1.5 : 1.5) : 0) + gauss() * 0.5));
  return memoryRows(rows, [8], y);
}

describe("trainModel", () => {
  it("learns from rows held in host memory, a batch at a time, and leaks no tensor", async () => {
    const before = tf.memory().numTensors;
    const input = tf.input({ shape: [8] });
    const model = tf.model({ inputs: input, outputs: applyLayers(headLayers(2, { ...DEFAULT_HEAD, dropout: 0, seed: 1 }), input) });
    const train = clusters(50, 1); // 50 rows, batch 16: the last batch is partial
    const val = clusters(40, 2);
    const history = await trainModel(model, train, val, 2, { learningRate: 0.05, epochs: 20, batchSize: 16, seed: 3, patience: 5 });
    expect(history.length).toBeGreaterThan(1);
    expect(history[0]?.loss).toBeGreaterThan(history.at(-1)?.loss as number);
    const probs = await predictRows(model, val, 7); // batches of 7: 40 rows → 6 batches, the last partial
    expect(probs).toHaveLength(40);
    const right = probs.filter((p, i) => (p[1] as number) > (p[0] as number) === (val.y[i] === 1)).length;
    expect(right / 40).toBeGreaterThan(0.9);
    for (const p of probs) expect((p[0] as number) + (p[1] as number)).toBeCloseTo(1, 5);
    model.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });
});
