/**
 * Benchmark-only worker: the bare inference of a served model inside workerd, with the production
 * code path for loading (registry, verification) and the same tfjs wasm backend, but no HTTP body,
 * decoding or preprocessing. Never deployed; used by bench/edge.ts.
 */

import { predictAll } from "../../functions/edge/src/model/predict.ts";
import { ModelRegistry } from "../../functions/edge/src/model/registry.ts";
import { createModelSource } from "../../functions/edge/src/model/source.ts";
import { initTf, tf } from "../../functions/edge/src/tf.ts";

interface BenchEnv {
  S3_BUCKET: string;
  S3_ENDPOINT: string;
  AWS_ACCESS_KEY_ID: string;
  AWS_SECRET_ACCESS_KEY: string;
}

let registry: ModelRegistry | undefined;

export default {
  async fetch(req: Request, env: BenchEnv, ctx: ExecutionContext): Promise<Response> {
    const url = new URL(req.url);
    if (url.pathname === "/healthz") return Response.json({ status: "ok" });
    const name = url.searchParams.get("model") ?? "bench";
    const n = Number(url.searchParams.get("n") ?? "50");
    await initTf();
    registry ??= new ModelRegistry(createModelSource(env), { ttlMs: 60_000, memoryBudgetBytes: Number.POSITIVE_INFINITY });
    const { model, release } = await registry.acquire(name, (p) => ctx.waitUntil(p));
    try {
      const size = model.metadata.input.size;
      const input = tf.randomUniform([1, size, size, 3], -1, 1);
      const times: number[] = [];
      for (let i = 0; i < n + 5; i++) {
        const t = performance.now();
        predictAll([model], input as tf.Tensor4D);
        if (i >= 5) times.push(performance.now() - t);
      }
      input.dispose();
      // Where the time goes: per-kernel totals of one inference.
      const zeros = tf.zeros([1, size, size, 3]) as tf.Tensor4D;
      const profile = await tf.profile(() => {
        predictAll([model], zeros);
      });
      zeros.dispose();
      const byKernel = new Map<string, number>();
      for (const k of profile.kernels) byKernel.set(k.name, (byKernel.get(k.name) ?? 0) + Number(k.kernelTimeMs));
      return Response.json({ size, times, kernels: Object.fromEntries([...byKernel.entries()].sort((a, b) => b[1] - a[1]).slice(0, 8)), load: model.timings });
    } finally {
      release();
    }
  },
} satisfies ExportedHandler<BenchEnv>;
