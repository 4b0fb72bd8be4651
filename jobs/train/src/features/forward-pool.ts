/**
 * Runs a frozen model's forward pass on every core. tfjs-backend-wasm is single-threaded in Node
 * (its threads need SharedArrayBuffer workers it cannot start there), so on CPU edgetune starts one
 * worker thread per core, each with its own wasm backend and a copy of the model, and spreads batches
 * over them. With a native TensorFlow backend (GPU or tfjs-node), which is multi-threaded already,
 * the pool has no workers and runs batches in this thread.
 */
import { availableParallelism } from "node:os";
import { Worker } from "node:worker_threads";
import * as tf from "@tensorflow/tfjs";
import { saveToMemory } from "../model/weights.ts";
import { type ForwardPool, type ForwardPoolOptions, workerPool } from "./worker-pool.ts";

function threadsFor(options: ForwardPoolOptions): number {
  return options.threads ?? (tf.getBackend() === "wasm" ? availableParallelism() : 0);
}

/**
 * ONNX Runtime where tfjs has no native backend (wasm or cpu: its forward pass is 3–4.4× faster
 * here, see bench/RESULTS.md); a GPU or tfjs-node backend keeps tfjs. EDGETUNE_FEATURE_ENGINE=tfjs or
 * onnxruntime forces one.
 */
function wantsOnnx(): boolean {
  const forced = process.env.EDGETUNE_FEATURE_ENGINE;
  if (forced === "tfjs") return false;
  if (forced === "onnxruntime") return true;
  return tf.getBackend() === "wasm" || tf.getBackend() === "cpu";
}

/**
 * A pool that starts its workers (and copies the model into them) on its first batch, so a run whose
 * features are all cached pays nothing, and the train and validation passes share one start-up.
 */
export function lazyForwardPool(model: tf.LayersModel, options: ForwardPoolOptions): ForwardPool {
  let pool: Promise<ForwardPool> | undefined;
  let created: ForwardPool | undefined;
  const start = () => {
    pool ??= createForwardPool(model, options).then((p) => {
      created = p;
      return p;
    });
    return pool;
  };
  return {
    // The extraction keeps threads + 1 batches in flight (one per tfjs worker; with ONNX Runtime one runs,
    // one waits): after `ready`, the created pool's own figures.
    get threads() {
      return created?.threads ?? (wantsOnnx() ? 1 : Math.max(1, threadsFor(options)));
    },
    get engine() {
      return created?.engine ?? (wantsOnnx() ? "onnxruntime" : `tfjs-${tf.getBackend()}`);
    },
    get fallback() {
      return created?.fallback;
    },
    async ready() {
      await start();
    },
    async run(data, n) {
      return (await start()).run(data, n);
    },
    async close() {
      if (pool) await (await pool).close();
    },
  };
}

export async function createForwardPool(model: tf.LayersModel, options: ForwardPoolOptions): Promise<ForwardPool> {
  // A worker script is a tfjs pool's (tests swap in one that crashes): it implies tfjs.
  if ((options.engine ?? (wantsOnnx() && !options.workerScript ? "onnxruntime" : "tfjs")) === "onnxruntime") {
    try {
      const { createOnnxPool } = await import("./onnx-pool.ts");
      return await createOnnxPool(model, options);
    } catch (e) {
      if (options.engine === "onnxruntime" || process.env.EDGETUNE_FEATURE_ENGINE === "onnxruntime") throw e;
      return tfjsPool(model, options, e instanceof Error ? e.message : String(e));
    }
  }
  return tfjsPool(model, options);
}

async function tfjsPool(model: tf.LayersModel, options: ForwardPoolOptions, fallback?: string): Promise<ForwardPool> {
  const threads = threadsFor(options);
  if (threads <= 1) return { ...localPool(model, options), fallback };
  const saved = await saveToMemory(model);
  const script = options.workerScript ?? new URL("./forward-worker.ts", import.meta.url);
  return workerPool({
    count: threads,
    spawn: () => new Worker(script, { workerData: { saved, size: options.size, pooled: options.pooled } }),
    engine: `tfjs-${tf.getBackend()}`,
    fallback,
  });
}

function localPool(model: tf.LayersModel, options: { size: number; pooled: boolean }): ForwardPool {
  return {
    threads: 1,
    engine: `tfjs-${tf.getBackend()}`,
    async run(data, n) {
      return forwardLocal(model, data, n, options.size, options.pooled);
    },
    async close() {},
  };
}

export function forwardLocal(model: tf.LayersModel, data: Float32Array, n: number, size: number, pooled: boolean): { shape: number[]; values: Float32Array[] } {
  const result = tf.tidy(() => {
    let y = model.predict(tf.tensor4d(data, [n, size, size, 3])) as tf.Tensor;
    if (pooled && y.rank === 4) y = tf.mean(y, [1, 2]);
    return y;
  });
  const flat = result.dataSync() as Float32Array;
  const shape = result.shape.slice(1);
  result.dispose();
  const dim = shape.reduce((a, b) => a * b, 1);
  return { shape, values: Array.from({ length: n }, (_, i) => flat.slice(i * dim, (i + 1) * dim)) };
}
