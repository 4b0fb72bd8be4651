#!/usr/bin/env node
/**
 * `npm run bench:finetune-memory` — peak memory of a fine-tuning run as the dataset grows. Each run is
 * a fresh process. What is measured is live memory, sampled right after a full garbage collection
 * every 250 ms: the JS heap plus the buffers outside it (typed arrays, the wasm heap, which never
 * shrinks). V8 lets garbage pile up while memory is plentiful and the allocator keeps freed pages, so
 * RSS (also printed) says more about how long a run was than about what it holds. Each child trains `--strategy finetune` on synthetic images in the
 * local S3 server, which lives in this parent process. Side by side, in the same child: the memory the
 * bottom maps take when they are all held at once (what fine-tuning did before the maps were streamed
 * from their packs), measured by loading them from the same cache after the run.
 *
 *   npm run bench:finetune-memory -- --counts 500,2000,6000 --size 96
 */
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import sharp from "sharp";
import { jobEnvironment } from "../infra/local/job-env.ts";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { arg, machine } from "./common.ts";

const run = promisify(execFile);
const size = Number(arg("size", "96"));
const counts = (arg("counts", "500,2000,6000") as string).split(",").map(Number);
const LABELS = ["red", "green", "blue"];

if (process.argv.includes("--child")) {
  await child(arg("dataset") as string);
} else {
  await parent();
}

async function parent(): Promise<void> {
  const s3 = await startLocalS3();
  const rows: { n: number; seconds: number; streamedMb: number; retainedMb: number; streamedRssMb: number; retainedRssMb: number; mapsMb: number }[] = [];
  try {
    for (const n of counts) {
      const dataset = `synthetic-${n}`;
      await upload(s3.store, dataset, n);
      const t = performance.now();
      const { stdout } = await run(process.execPath, ["--expose-gc", import.meta.filename, "--child", "--dataset", dataset, "--size", String(size)], {
        env: jobEnvironment(s3.config),
        maxBuffer: 64 * 1024 * 1024,
      });
      const r = JSON.parse(stdout.trim().split("\n").at(-1) as string) as Omit<(typeof rows)[number], "n" | "seconds">;
      rows.push({ n, seconds: (performance.now() - t) / 1000, ...r });
      process.stderr.write(`${n} images: ${JSON.stringify(r)}\n`);
    }
  } finally {
    await s3.stop();
  }
  const first = rows[0] as (typeof rows)[number];
  console.log(`Fine-tuning peak live memory by dataset size, ${size} px, 1 view, darknet-tiny, 2 + 2 epochs (${machine()})\n`);
  console.log(
    "| images | maps (float32) | live memory, maps streamed (now) | × smallest | live memory, maps held (before) | × smallest | RSS after GC, streamed / held | run |",
  );
  console.log("|---|---|---|---|---|---|---|---|");
  for (const r of rows)
    console.log(
      `| ${r.n} | ${r.mapsMb.toFixed(0)} MB | ${r.streamedMb.toFixed(0)} MB | ${(r.streamedMb / first.streamedMb).toFixed(2)} | ${r.retainedMb.toFixed(0)} MB | ${(r.retainedMb / first.retainedMb).toFixed(2)} | ${r.streamedRssMb.toFixed(0)} / ${r.retainedRssMb.toFixed(0)} MB | ${r.seconds.toFixed(0)} s |`,
    );
}

/** `n` small noisy images whose colour is their label, manifest last. */
async function upload(store: import("#shared/s3/store.ts").ObjectStore, dataset: string, n: number): Promise<void> {
  const colours: Record<string, { r: number; g: number; b: number }> = {
    red: { r: 200, g: 40, b: 40 },
    green: { r: 40, g: 200, b: 40 },
    blue: { r: 40, g: 40, b: 200 },
  };
  const files = Array.from({ length: n }, (_, i) => ({ label: LABELS[i % 3] as string, i }));
  for (let b = 0; b < files.length; b += 64) {
    await Promise.all(
      files.slice(b, b + 64).map(async ({ label, i }) => {
        const png = await sharp({
          create: {
            width: 64,
            height: 64,
            channels: 3,
            background: colours[label] as { r: number; g: number; b: number },
            noise: { type: "gaussian", mean: 128, sigma: 40 + (i % 17) },
          },
        })
          .png()
          .toBuffer();
        await store.put(`datasets/${dataset}/${label}/${i}.png`, png);
      }),
    );
  }
  await store.put(`datasets/${dataset}/manifest.json`, JSON.stringify({ schemaVersion: 1 }));
}

async function child(dataset: string): Promise<void> {
  const { S3ObjectStore } = await import("#shared/s3/client.ts");
  const { s3ConfigFromEnv } = await import("#shared/s3/config.ts");
  const { train } = await import("../jobs/train/src/train.ts");
  const { createLogger } = await import("../jobs/train/src/log.ts");
  const store = new S3ObjectStore(s3ConfigFromEnv(process.env));
  const gc = (globalThis as { gc?: () => void }).gc ?? (() => {});
  let live = 0;
  let rss = 0;
  const sample = () => {
    gc();
    // JS heap and the buffers outside it (typed arrays, the wasm heap): what the process holds on to.
    const m = process.memoryUsage();
    live = Math.max(live, m.heapUsed + m.external);
    rss = Math.max(rss, m.rss);
  };
  const sampler = setInterval(sample, 250);
  // A seed per dataset gives each run a feature cache of its own (the seed is part of the cache key), so
  // the maps counted below are this dataset's only.
  const options = {
    dataset,
    seed: Number(dataset.replace(/\D/g, "")),
    strategy: "finetune" as const,
    imageSize: size as 96,
    views: 1,
    head: { epochs: 2 },
    fineTune: { epochs: 2 },
    promote: "always" as const,
  };
  await train(store, options, createLogger({ json: true, quiet: true, stream: process.stderr }));
  sample();
  const streamedMb = live / 1024 / 1024;
  const streamedRssMb = rss / 1024 / 1024;

  // The same maps, all held at once as fine-tuning used to hold them: read back from their cache.
  const { planRun } = await import("../jobs/train/src/plan.ts");
  const { runContext } = await import("../jobs/train/src/run.ts");
  const { loadBase } = await import("../jobs/train/src/model/bases.ts");
  const { extractSplits } = await import("../jobs/train/src/features/extract.ts");
  const tf = await import("@tensorflow/tfjs");
  const ctx = runContext(store, createLogger({ json: true, quiet: true, stream: process.stderr }));
  const plan = await planRun(ctx, { ...options, force: true });
  const base = await loadBase(store, plan.base, size);
  const from = plan.base.fineTuneFrom as string;
  const bottom = tf.model({ inputs: base.inputs, outputs: base.getLayer(from).output as import("@tensorflow/tfjs").SymbolicTensor });
  const images = plan.dataset.images;
  const maps = await extractSplits(
    store,
    bottom,
    { ...plan.pooledSpec, layer: from, pooled: false },
    { train: images.filter((i) => i.split === "train"), heldOut: images.filter((i) => i.split !== "train") },
    () => {},
  );
  let mapsBytes = 0;
  for (const views of maps.byId.values()) for (const v of views) mapsBytes += v.byteLength;
  sample();
  clearInterval(sampler);
  const retainedMb = live / 1024 / 1024;
  process.stdout.write(`${JSON.stringify({ streamedMb, retainedMb, streamedRssMb, retainedRssMb: rss / 1024 / 1024, mapsMb: mapsBytes / 1024 / 1024 })}\n`);
}
