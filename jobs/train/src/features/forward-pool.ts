import { availableParallelism } from "node:os";
import { Worker } from "node:worker_threads";
import * as tf from "@tensorflow/tfjs";
import { saveToMemory } from "../model/weights.ts";

/**
 * Runs a frozen model's forward pass on every core. tfjs-backend-wasm is single-threaded in Node
 * (its threads need SharedArrayBuffer workers it cannot start there), so on CPU edgetune starts one
 * worker thread per core, each with its own wasm backend and a copy of the model, and spreads batches
 * over them. With a native TensorFlow backend (GPU or tfjs-node), which is multi-threaded already,
 * the pool has no workers and runs batches in this thread.
 */
export interface ForwardPool {
  readonly threads: number;
  /** What computes the forward pass: "onnxruntime", or "tfjs-<backend>". */
  readonly engine: string;
  /** Why ONNX Runtime is not used where it would have been (the export or the runtime failed). */
  readonly fallback?: string;
  /** Makes the pool (a lazy one starts it here); `threads` and `engine` are final afterwards. */
  ready?(): Promise<void>;
  /**
   * Forward of `n` inputs packed in `data` (n × inputSize), pooled over space if `pooled`; values per
   * row. `data` belongs to the pool from here (a worker pool transfers it); a pool that hands it back
   * afterwards says so in `input`, for the caller to fill again instead of allocating another batch.
   */
  run(data: Float32Array, n: number): Promise<{ shape: number[]; values: Float32Array[]; input?: Float32Array }>;
  close(): Promise<void>;
}

export interface ForwardPoolOptions {
  size: number;
  pooled: boolean;
  /** Worker threads; default: one per core on wasm, none (this thread) on a native backend. */
  threads?: number;
  /** The worker's script; default forward-worker.ts (tests swap in one that crashes). */
  workerScript?: URL;
  /** Which engine; default: ONNX Runtime where it helps (see wantsOnnx). */
  engine?: "tfjs" | "onnxruntime";
}

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

/**
 * Batches spread over worker threads, each answering one batch at a time (a tfjs wasm backend each, or
 * the one ONNX Runtime session). A worker says `{ ready: true }` or `{ error }` once started, then
 * answers each `{ data, n }` with `{ shape, values, input? }` (input: `data` transferred back) or `{ error }`.
 */
export async function workerPool(options: { count: number; spawn: () => Worker; engine: string; fallback?: string }): Promise<ForwardPool> {
  const started = await Promise.allSettled(
    Array.from({ length: options.count }, async () => {
      const w = options.spawn();
      try {
        await new Promise<void>((resolve, reject) => {
          w.once("message", (m: { ready?: boolean; error?: string }) => (m.ready ? resolve() : reject(new Error(m.error))));
          w.once("error", reject);
          w.once("exit", (code) => reject(new Error(`a forward-pass worker stopped while starting (exit code ${code})`)));
        });
      } catch (e) {
        await w.terminate();
        throw e;
      }
      return w;
    }),
  );
  const workers = started.flatMap((s) => (s.status === "fulfilled" ? [s.value] : []));
  const failed = started.find((s) => s.status === "rejected");
  if (failed) {
    await Promise.all(workers.map((w) => w.terminate()));
    throw failed.reason;
  }
  const idle = [...workers];
  const waiting: { resolve: (w: Worker) => void; reject: (e: Error) => void }[] = [];
  // A worker that dies (not an exception in the forward pass: those come back as messages) breaks the
  // pool: every batch waiting or to come fails with the reason, instead of waiting forever. The
  // extraction then fails and resumes from its written packs.
  let broken: Error | undefined;
  let closing = false;
  const inFlight = new Map<Worker, (e: Error) => void>();
  const breakPool = (reason: Error) => {
    broken ??= reason;
    for (const w of waiting.splice(0)) w.reject(broken);
    for (const reject of inFlight.values()) reject(broken);
    inFlight.clear();
  };
  for (const w of workers) {
    // Busy or idle: a dead worker's batch (or its next one) would never be answered.
    w.once("exit", (code) => closing || breakPool(new Error(`a forward-pass worker stopped (exit code ${code})`)));
    w.on("error", (e) => breakPool(new Error(`a forward-pass worker failed: ${e.message}`)));
  }
  const acquire = () =>
    new Promise<Worker>((resolve, reject) => {
      if (broken) reject(broken);
      else if (idle.length > 0) resolve(idle.pop() as Worker);
      else waiting.push({ resolve, reject });
    });
  const release = (w: Worker) => {
    const next = waiting.shift();
    if (next) next.resolve(w);
    else idle.push(w);
  };
  return {
    threads: options.count,
    engine: options.engine,
    fallback: options.fallback,
    async run(data, n) {
      const w = await acquire();
      try {
        return await new Promise((resolve, reject) => {
          inFlight.set(w, reject);
          w.once("message", (m: { shape: number[]; values: Float32Array; input?: Float32Array; error?: string }) => {
            inFlight.delete(w);
            if (m.error) return reject(new Error(m.error));
            const dim = m.shape.reduce((a, b) => a * b, 1);
            const values = Array.from({ length: n }, (_, i) => m.values.subarray(i * dim, (i + 1) * dim));
            resolve({ shape: m.shape, values, ...(m.input ? { input: m.input } : {}) });
          });
          w.postMessage({ data, n }, [data.buffer as ArrayBuffer]);
        });
      } finally {
        if (!broken) release(w);
      }
    },
    async close() {
      closing = true;
      await Promise.all(workers.map((w) => w.terminate()));
    },
  };
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
