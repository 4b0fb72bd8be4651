import { Worker } from "node:worker_threads";
import * as tf from "@tensorflow/tfjs";
import { beforeAll, describe, expect, it } from "vitest";
import { initBackend } from "../model/backend.ts";
import { createForwardPool, forwardLocal } from "./forward-pool.ts";
import { workerPool } from "./worker-pool.ts";

let model: tf.LayersModel;
beforeAll(async () => {
  await initBackend();
  const input = tf.input({ shape: [8, 8, 3] });
  const conv = tf.layers.conv2d({ filters: 4, kernelSize: 3, kernelInitializer: tf.initializers.glorotUniform({ seed: 2 }) }).apply(input);
  model = tf.model({ inputs: input, outputs: conv as tf.SymbolicTensor });
});

const batch = (n: number) => Float32Array.from({ length: n * 8 * 8 * 3 }, (_, i) => (i % 17) / 17);

describe("forward pool", () => {
  it("spreads batches over worker threads and answers as this thread would", async () => {
    const pool = await createForwardPool(model, { size: 8, pooled: true, threads: 2, engine: "tfjs" });
    try {
      const outs = await Promise.all([pool.run(batch(3), 3), pool.run(batch(5), 5), pool.run(batch(2), 2)]);
      expect(outs.map((o) => o.values.length)).toEqual([3, 5, 2]);
      expect(outs[1]?.values[4]).toEqual(forwardLocal(model, batch(5), 5, 8, true).values[4]);
    } finally {
      await pool.close();
    }
  });

  it("fails every batch, in flight or to come, when a worker dies, instead of waiting forever", async () => {
    const workerScript = new URL("../../../../test/support/crashing-forward-worker.ts", import.meta.url);
    const pool = await createForwardPool(model, { size: 8, pooled: true, threads: 2, workerScript, engine: "tfjs" });
    try {
      const runs = [pool.run(batch(1), 1), pool.run(batch(1), 1), pool.run(batch(1), 1)];
      const outcomes = await Promise.all(
        runs.map((r) =>
          r.then(
            () => "answered",
            (e: Error) => e.message,
          ),
        ),
      );
      expect(outcomes).toEqual(Array(3).fill("a forward-pass worker stopped (exit code 7)"));
      await expect(pool.run(batch(1), 1)).rejects.toThrow(/worker stopped/);
    } finally {
      await pool.close();
    }
  });

  it("fails to start, with the worker's reason, when a worker cannot load its engine (the caller then falls back)", async () => {
    const spawn = () => new Worker(`require("node:worker_threads").parentPort.postMessage({ error: "the runtime did not load" })`, { eval: true });
    await expect(workerPool({ count: 2, spawn, engine: "onnxruntime" })).rejects.toThrow("the runtime did not load");
  });

  it("hands a batch's input buffer back when the worker returns it, for the next batch to reuse", async () => {
    const echo = `const { parentPort } = require("node:worker_threads");
      parentPort.postMessage({ ready: true });
      parentPort.on("message", ({ data, n }) => {
        const values = new Float32Array(n).map((_, i) => data[i * 2]);
        parentPort.postMessage({ shape: [1], values, input: data }, [values.buffer, data.buffer]);
      });`;
    const pool = await workerPool({ count: 1, spawn: () => new Worker(echo, { eval: true }), engine: "test" });
    try {
      const data = Float32Array.from([1, 2, 3, 4]);
      const out = await pool.run(data, 2);
      expect(data.byteLength).toBe(0); // transferred to the worker
      expect(out.values.map((v) => v[0])).toEqual([1, 3]);
      expect(Array.from(out.input ?? [])).toEqual([1, 2, 3, 4]);
    } finally {
      await pool.close();
    }
  });
});
