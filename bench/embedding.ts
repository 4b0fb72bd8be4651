#!/usr/bin/env node
/**
 * `npm run bench:embedding` — throughput of the feature pipeline (S3 GET + decode + preprocess +
 * forward) against the bare forward pass of the same model and backend, measured side by side in one
 * run: single thread, then every core; on tfjs (wasm: one worker thread per core) and on ONNX Runtime
 * (its native CPU kernels, one session with that many intra-op threads). Images: the first N of
 * cats_and_dogs_filtered/train from ../shared/data (or the bundled Twemoji sample if absent).
 *
 *   npm run bench:embedding -- --images 512 --size 224 --base nsfwjs-mobilenet-v2
 */
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import type { ObjectStore } from "#shared/s3/store.ts";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { DEFAULT_OPTIONS } from "../jobs/train/src/config.ts";
import type { DatasetImage } from "../jobs/train/src/dataset/read.ts";
import { sampleDataset } from "../jobs/train/src/dataset/sample.ts";
import { extractFeatures, extractorFor, featureSpec } from "../jobs/train/src/features/extract.ts";
import { createForwardPool } from "../jobs/train/src/features/forward-pool.ts";
import { initBackend } from "../jobs/train/src/model/backend.ts";
import { ensureBase, loadBase } from "../jobs/train/src/model/bases.ts";
import { arg, BENCH_BASE, hasShared, machine, SHARED } from "./common.ts";

const N = Number(arg("images", "512"));
const size = Number(arg("size", "224"));
const backend = await initBackend();
const s3 = await startLocalS3();
const base = await ensureBase(s3.store, arg("base", BENCH_BASE) as string);
const model = await loadBase(s3.store, base, size);
// The extractor a head-strategy run of this base uses (several layers pooled where the base has them).
const headSpec = featureSpec(base, { ...DEFAULT_OPTIONS, imageSize: size as 224, strategy: "head" }).pooledSpec;
const extractor = extractorFor(model, headSpec);

// Upload the images.
const images: DatasetImage[] = [];
if (hasShared("data", "cats_and_dogs_filtered")) {
  const dir = join(SHARED, "data", "cats_and_dogs_filtered", "train", "cats");
  for (const f of (await readdir(dir)).slice(0, N)) {
    const key = `datasets/bench/cats/${f}`;
    const { etag } = await s3.store.put(key, await readFile(join(dir, f)));
    images.push({ key, id: `${etag.replaceAll('"', "")}-bench`, label: "cats", split: "train" });
  }
} else {
  for (const i of (await sampleDataset({ perLabel: Math.ceil(N / 3), size: 256 })).slice(0, N)) {
    const key = `datasets/bench/${i.file}`;
    const { etag } = await s3.store.put(key, i.bytes);
    images.push({ key, id: `${etag.replaceAll('"', "")}-bench`, label: i.label, split: "train" });
  }
}

const cores = (await import("node:os")).availableParallelism();
/** The bucket's objects in a Map, behind the same interface (writes kept too): no server, no HTTP. */
const objects = new Map<string, Uint8Array>();
for (const i of images) objects.set(i.key, (await s3.store.get(i.key)) as Uint8Array);
const memory: ObjectStore = {
  get: async (k) => objects.get(k) ?? null,
  put: async (k, b) => {
    objects.set(k, typeof b === "string" ? new TextEncoder().encode(b) : b);
    return { etag: "" };
  },
  putIfAbsent: async (k, b) => {
    if (objects.has(k)) return false;
    objects.set(k, typeof b === "string" ? new TextEncoder().encode(b) : b);
    return true;
  },
  putIfMatch: async () => false, // nothing here compares and swaps
  head: async (k) => (objects.has(k) ? { etag: "", size: objects.get(k)?.byteLength ?? 0 } : null),
  async *list(prefix) {
    for (const k of [...objects.keys()].sort()) if (k.startsWith(prefix)) yield { key: k, etag: "", size: 0 };
  },
  async *listFolders() {},
  delete: async (ks) => {
    for (const k of ks) objects.delete(k);
  },
  deleteIfMatch: async () => false, // nor deletes conditionally
};
const results: Record<string, number> = {};
const startup: Record<string, number> = {};
/** CPU time of the whole process (every thread) per image: where a ratio below 1 comes from. */
const cpuMs: Record<string, number> = {};
const cpuPerImage = (since: NodeJS.CpuUsage) => {
  const d = process.cpuUsage(since);
  return (d.user + d.system) / 1000 / images.length;
};
const engines = ["tfjs", "onnxruntime"] as const;
for (const [engine, threads] of engines.flatMap((e) => [1, cores].map((t) => [e, t] as const))) {
  const label = (what: string) => `${what}, ${engine === "tfjs" ? backend.name : "onnxruntime"}, ${threads} thread(s)`;
  // Bare forward: the same number of preprocessed-size inputs, no I/O, no decoding.
  const t0 = performance.now();
  const pool = await createForwardPool(extractor, { size, pooled: true, threads, engine });
  const startedIn = (performance.now() - t0) / 1000;
  const batch = 32;
  const warm = new Float32Array(batch * size * size * 3);
  await Promise.all(Array.from({ length: pool.threads }, () => pool.run(warm.slice(), batch)));
  let cpu = process.cpuUsage();
  let t = performance.now();
  const runs: Promise<unknown>[] = [];
  for (let i = 0; i < images.length; i += batch)
    runs.push(pool.run(new Float32Array(Math.min(batch, images.length - i) * size * size * 3).fill(0.5), Math.min(batch, images.length - i)));
  await Promise.all(runs);
  results[label("bare forward")] = images.length / ((performance.now() - t) / 1000);
  cpuMs[label("bare forward")] = cpuPerImage(cpu);

  // The pipeline on the same warm pool, cold cache (a fresh seed gives a fresh cache key). The pool's
  // start-up (workers, model copies) is paid once per training run, not per image; it is timed apart.
  cpu = process.cpuUsage();
  t = performance.now();
  // What a head run extracts (its preprocessing too), one view, a fresh seed per row.
  const spec = { ...headSpec, views: 1, seed: 1000 + threads + (engine === "tfjs" ? 0 : 100) };
  const f = await extractFeatures(s3.store, extractor, spec, images, () => {}, { pool });
  if (f.stats.computed !== images.length) throw new Error(`computed ${f.stats.computed} of ${images.length}`);
  results[label("pipeline (S3 + decode + preprocess + forward)")] = images.length / ((performance.now() - t) / 1000);
  cpuMs[label("pipeline (S3 + decode + preprocess + forward)")] = cpuPerImage(cpu);

  // The same pipeline reading from memory: what it costs without an S3 server on this machine (in AWS,
  // S3 is not on the training host; here the emulator answers every GET on the same 2 cores).
  if (threads === cores) {
    cpu = process.cpuUsage();
    t = performance.now();
    const g = await extractFeatures(memory, extractor, { ...spec, seed: spec.seed + 10 }, images, () => {}, { pool });
    if (g.stats.computed !== images.length) throw new Error(`computed ${g.stats.computed} of ${images.length}`);
    results[label("pipeline, images from memory (no S3 server here)")] = images.length / ((performance.now() - t) / 1000);
    cpuMs[label("pipeline, images from memory (no S3 server here)")] = cpuPerImage(cpu);
  }
  await pool.close();
  startup[label("start-up")] = startedIn;
}
await s3.stop();

const lines = Object.entries(results).map(([k, v]) => `| ${k} | ${v.toFixed(1)} images/s | ${cpuMs[k]?.toFixed(1)} ms |`);
const get = (what: string, engine: string, threads: number) => results[`${what}, ${engine}, ${threads} thread(s)`] as number;
const pipe = (e: string) => get("pipeline (S3 + decode + preprocess + forward)", e, cores);
const bare = (e: string) => get("bare forward", e, cores);
console.log(`Embedding throughput, ${images.length} images at ${size} px, base ${base.id} (${machine()})\n`);
console.log(`| measurement | throughput | CPU per image (all threads) |\n|---|---|---|\n${lines.join("\n")}`);
console.log(
  `\npipeline / bare forward (${cores} threads): ${backend.name} ${(pipe(backend.name) / bare(backend.name)).toFixed(2)}, onnxruntime ${(pipe("onnxruntime") / bare("onnxruntime")).toFixed(2)}`,
);
console.log(`pipeline onnxruntime / pipeline ${backend.name} (${cores} threads): ${(pipe("onnxruntime") / pipe(backend.name)).toFixed(2)}`);
const fromMemory = (e: string) => get("pipeline, images from memory (no S3 server here)", e, cores);
console.log(
  `pipeline from memory / bare forward (${cores} threads): ${backend.name} ${(fromMemory(backend.name) / bare(backend.name)).toFixed(2)}, onnxruntime ${(fromMemory("onnxruntime") / bare("onnxruntime")).toFixed(2)}`,
);
console.log(
  `bare forward ${cores} threads / 1 thread: ${backend.name} ${(bare(backend.name) / get("bare forward", backend.name, 1)).toFixed(2)}, onnxruntime ${(bare("onnxruntime") / get("bare forward", "onnxruntime", 1)).toFixed(2)}`,
);
console.log(
  `pool start-up (once per run): ${Object.entries(startup)
    .map(([k, s]) => `${k.replace("start-up, ", "")} ${s.toFixed(2)} s`)
    .join("; ")}`,
);
