import { availableParallelism } from "node:os";
import { Worker } from "node:worker_threads";
import type * as tf from "@tensorflow/tfjs";
import { toOnnx } from "../model/onnx.ts";
import { type ForwardPool, type ForwardPoolOptions, workerPool } from "./worker-pool.ts";

/**
 * The frozen base's forward pass on ONNX Runtime's native CPU kernels (onnxruntime-node, whose CPU
 * binaries ship inside the npm package), from the ONNX export of the same folded graph
 * (model/onnx.ts). One session uses every core itself (intra-op threads), so batches run one at a
 * time while the pipeline decodes and preprocesses the next.
 *
 * The session lives in a worker thread: onnxruntime-node's `run` is synchronous on the thread that
 * calls it (its promise only defers the call), so on the main thread every batch's forward pass
 * stopped the preprocessing of the next one — half of the main thread's time (profiled 2026-11-29).
 * Throws if the export fails (a layer it does not know) or the runtime does not load; the caller then
 * uses tfjs (forward-pool.ts).
 */
export async function createOnnxPool(model: tf.LayersModel, options: ForwardPoolOptions): Promise<ForwardPool> {
  const bytes = toOnnx(model, { size: options.size, pooled: options.pooled });
  const threads = options.threads ?? availableParallelism();
  return workerPool({
    count: 1,
    spawn: () => new Worker(new URL("./onnx-worker.ts", import.meta.url), { workerData: { bytes, size: options.size, threads } }),
    engine: "onnxruntime",
  });
}
