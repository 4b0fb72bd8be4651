import { spawn } from "node:child_process";
import { join } from "node:path";
import { pMapIterable } from "p-map";
import type { S3Config } from "#shared/s3/config.ts";
import { type EmbedFanOut, embedCommand } from "../../jobs/train/src/features/fan-out.ts";
import { jobEnvironment } from "./job-env.ts";

/**
 * The local stand-in for the Embed array job of infra/constructs/training-batch.ts: each child is the
 * command Batch would run (`edgetune embed … --shards N`) in a process of its own, told its index by
 * AWS_BATCH_JOB_ARRAY_INDEX as Batch tells it, at most `parallel` at a time.
 */
export function localFanOut(s3: S3Config, options: { imagesPerShard: number; maxShards: number; parallel?: number }): EmbedFanOut & { exits: number[] } {
  const cli = join(import.meta.dirname, "..", "..", "jobs", "train", "cli.ts");
  const exits: number[] = [];
  return {
    imagesPerShard: options.imagesPerShard,
    maxShards: options.maxShards,
    exits,
    async run(request) {
      const child = (index: number) =>
        new Promise<number>((resolve) => {
          const env = jobEnvironment(s3, { AWS_BATCH_JOB_ARRAY_INDEX: String(index) });
          const p = spawn(process.execPath, [cli, ...embedCommand(request)], { env, stdio: "ignore" });
          p.once("exit", (code) => resolve(code ?? 1));
          p.once("error", () => resolve(1));
        });
      const indices = Array.from({ length: request.shards }, (_, i) => i);
      for await (const code of pMapIterable(indices, child, { concurrency: options.parallel ?? 2 })) exits.push(code);
      const failed = exits.filter((c) => c !== 0).length;
      return { succeeded: request.shards - failed, failed };
    },
  };
}
