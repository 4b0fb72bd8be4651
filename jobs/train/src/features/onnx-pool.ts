import { availableParallelism } from "node:os";
import type * as tf from "@tensorflow/tfjs";
import { toOnnx } from "../model/onnx.ts";
import type { ForwardPool, ForwardPoolOptions } from "./forward-pool.ts";

/**
 * The frozen base's forward pass on ONNX Runtime's native CPU kernels (onnxruntime-node, whose CPU
 * binaries ship inside the npm package), from the ONNX export of the same folded graph
 * (model/onnx.ts). One session uses every core itself (intra-op threads), so batches run one at a
 * time while the pipeline decodes and preprocesses the next. Throws if the runtime does not load or a
 * layer has no export; the caller then uses tfjs (forward-pool.ts).
 */
export async function createOnnxPool(model: tf.LayersModel, options: ForwardPoolOptions): Promise<ForwardPool> {
  const bytes = toOnnx(model, { size: options.size, pooled: options.pooled });
  const ort = await import("onnxruntime-node");
  const session = await ort.InferenceSession.create(bytes, {
    intraOpNumThreads: options.threads ?? availableParallelism(),
    interOpNumThreads: 1,
    graphOptimizationLevel: "all",
    logSeverityLevel: 3,
  });
  let turn: Promise<unknown> = Promise.resolve();
  return {
    threads: 1,
    engine: "onnxruntime",
    run(data, n) {
      const result = turn.then(async () => {
        const out = await session.run({ input: new ort.Tensor("float32", data, [n, options.size, options.size, 3]) });
        const features = out.features as { dims: readonly number[]; data: Float32Array };
        const shape = features.dims.slice(1);
        const dim = shape.reduce((a, b) => a * b, 1);
        // Views of the output buffer (a new one per run): no second copy of a batch of maps.
        return { shape, values: Array.from({ length: n }, (_, i) => features.data.subarray(i * dim, (i + 1) * dim)) };
      });
      turn = result.catch(() => {});
      return result;
    },
    async close() {
      await turn;
      await session.release();
    },
  };
}
