import * as tf from "@tensorflow/tfjs";
import { beforeAll, describe, expect, it } from "vitest";
import { mulberry32 } from "../dataset/augment.ts";
import { initBackend } from "../model/backend.ts";
import { applyLayers, DEFAULT_HEAD, headLayers, predictRows } from "./head.ts";
import { memoryRows } from "./rows.ts";
import { foldStandardization, standardizedRows, standardizerOf, unfoldStandardization } from "./standardize.ts";

beforeAll(async () => {
  await initBackend();
});

/** Rows whose features differ in scale by orders of magnitude, as features pooled from several layers do. */
function rows(n: number, seed: number) {
  const rand = mulberry32(seed);
  const scales = [0.01, 1, 50, 3, 0.2, 1000];
  const values = Array.from({ length: n }, () => Float32Array.from(scales, (s) => s * (rand() + 0.5)));
  return memoryRows(
    values,
    [scales.length],
    Int32Array.from({ length: n }, (_, i) => i % 3),
  );
}

async function largestDifference(a: tf.Tensor | undefined, b: tf.Tensor | undefined): Promise<number> {
  return Math.max(
    ...(await tf
      .sub(a as tf.Tensor, b as tf.Tensor)
      .abs()
      .data()),
  );
}

async function all(source: ReturnType<typeof rows>): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  for await (const { ids, values } of source.batches(7, null)) for (let r = 0; r < ids.length; r++) out.push(values.slice(r * 6, (r + 1) * 6));
  return out;
}

describe("standardised head features", () => {
  it("gives every feature mean 0 and deviation 1 over the training rows", async () => {
    const train = rows(200, 1);
    const standardized = await all(standardizedRows(train, await standardizerOf(train)));
    for (let i = 0; i < 6; i++) {
      const column = standardized.map((r) => r[i] as number);
      const mean = column.reduce((a, b) => a + b, 0) / column.length;
      const variance = column.reduce((a, b) => a + (b - mean) ** 2, 0) / column.length;
      expect(Math.abs(mean)).toBeLessThan(1e-4);
      expect(variance).toBeCloseTo(1, 2);
    }
  });

  it("does not magnify a feature that barely varies around a large value, nor one constant in training", async () => {
    const values = Array.from({ length: 50 }, (_, i) => Float32Array.from([100 + (i % 2) * 0.01, 7, i]));
    const s = await standardizerOf(memoryRows(values, [3], new Int32Array(50)));
    expect(s.std[0]).toBeCloseTo(10, 1); // a tenth of its RMS, not its 0.005 deviation
    expect(s.std[1]).toBe(1);
    expect(s.std[2]).toBeCloseTo(14.43, 1); // an ordinary feature: its deviation
  });

  for (const units of [0, 5]) {
    it(`folded into the first dense layer (${units ? "hidden layer" : "softmax only"}), the head answers on raw features as it did on standardised ones`, async () => {
      const train = rows(120, 2);
      const s = await standardizerOf(train);
      const head = headLayers(3, { ...DEFAULT_HEAD, units, seed: 3 });
      const input = tf.input({ shape: [6] });
      const model = tf.model({ inputs: input, outputs: applyLayers(head, input) });
      const onStandardized = await predictRows(model, standardizedRows(rows(30, 9), s));
      foldStandardization(head, s);
      const onRaw = await predictRows(model, rows(30, 9));
      let worst = 0;
      onRaw.forEach((p, i) => {
        p.forEach((v, j) => {
          worst = Math.max(worst, Math.abs(v - ((onStandardized[i] as Float32Array)[j] as number)));
        });
      });
      expect(worst).toBeLessThan(1e-4);
      // And back: unfolding the folded weights gives the standardised-space weights again.
      const dense = head.find((l) => l.getWeights().length > 0) as tf.layers.Layer;
      const folded = dense.getWeights().map((t) => t.clone()); // getWeights gives the variables themselves
      const back = unfoldStandardization(folded, s);
      foldStandardization(head, s); // folds the already-folded weights once more: changes them
      expect(await largestDifference(dense.getWeights()[0], folded[0])).toBeGreaterThan(1e-3);
      dense.setWeights(back);
      foldStandardization(head, s);
      const again = dense.getWeights();
      expect(await largestDifference(again[0], folded[0])).toBeLessThan(1e-4);
      expect(await largestDifference(again[1], folded[1])).toBeLessThan(1e-3);
    });
  }
});
