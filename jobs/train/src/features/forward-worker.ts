/** One forward-pass thread of `forward-pool.ts`: its own wasm backend, its own copy of the model. */
import { parentPort, workerData } from "node:worker_threads";
import * as tf from "@tensorflow/tfjs";
import { initBackend } from "../model/backend.ts";
import type { SavedModel } from "../model/weights.ts";
import { forwardLocal } from "./forward-pool.ts";

const { saved, size, pooled } = workerData as { saved: SavedModel; size: number; pooled: boolean };
const port = parentPort as NonNullable<typeof parentPort>;
try {
  await initBackend({ EDGETUNE_BACKEND: "wasm" });
  const model = await tf.loadLayersModel(
    tf.io.fromMemory({ modelTopology: saved.modelTopology, weightSpecs: saved.weightSpecs, weightData: saved.weightData }),
  );
  port.postMessage({ ready: true });
  port.on("message", ({ data, n }: { data: Float32Array; n: number }) => {
    try {
      const { shape, values } = forwardLocal(model, data, n, size, pooled);
      const dim = shape.reduce((a, b) => a * b, 1);
      const out = new Float32Array(n * dim);
      values.forEach((v, i) => {
        out.set(v, i * dim);
      });
      port.postMessage({ shape, values: out }, [out.buffer]);
    } catch (e) {
      port.postMessage({ error: e instanceof Error ? e.message : String(e) });
    }
  });
} catch (e) {
  port.postMessage({ error: e instanceof Error ? e.message : String(e) });
}
