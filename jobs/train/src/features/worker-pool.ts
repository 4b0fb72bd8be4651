import type { Worker } from "node:worker_threads";

/**
 * A forward pass spread over threads, whatever computes it: forward-pool.ts makes tfjs pools and
 * onnx-pool.ts ONNX Runtime ones, both on workerPool below. Its own module so the two need not import
 * each other.
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
