/** The ONNX Runtime session of `onnx-pool.ts`, in a thread of its own (see there why). */
import { parentPort, workerData } from "node:worker_threads";

const { bytes, size, threads } = workerData as { bytes: Uint8Array; size: number; threads: number };
const port = parentPort as NonNullable<typeof parentPort>;
try {
  const ort = await import("onnxruntime-node");
  const session = await ort.InferenceSession.create(bytes, {
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    graphOptimizationLevel: "all",
    logSeverityLevel: 3,
    // Idle intra-op threads sleep instead of spinning: between batches the cores decode and preprocess.
    extra: { session: { intra_op: { allow_spinning: "0" } } },
  });
  port.postMessage({ ready: true });
  port.on("message", async ({ data, n }: { data: Float32Array; n: number }) => {
    try {
      const out = await session.run({ input: new ort.Tensor("float32", data, [n, size, size, 3]) });
      const features = out.features as { dims: readonly number[]; data: Float32Array };
      // A copy of the output is handed over (a few hundred KB per batch): newer onnxruntime-node builds
      // return outputs in external buffers, which cannot be transferred. The input goes back to be refilled.
      const values = features.data.slice();
      port.postMessage({ shape: features.dims.slice(1), values, input: data }, [values.buffer as ArrayBuffer, data.buffer as ArrayBuffer]);
    } catch (e) {
      port.postMessage({ error: e instanceof Error ? e.message : String(e) });
    }
  });
} catch (e) {
  port.postMessage({ error: e instanceof Error ? e.message : String(e) });
}
