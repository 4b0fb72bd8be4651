#!/usr/bin/env node
/**
 * `npm run bench:edge` — the edge worker in local workerd (wrangler dev, production config), in one
 * run: warm end-to-end classify latency of a real JPEG (p50/p95/p99 over many requests) against the
 * bare inference of the same weights in workerd (bench/edge/bare-worker.ts); where inference time
 * goes (top kernels); cold start (first classify after isolate start, split into model fetch, parse,
 * warm-up); peak memory of the workerd process around a 12-megapixel JPEG; and the same warm requests
 * again with traffic capture storing every answer (capture/capture.ts), side by side.
 * `--size 160` benchmarks a model trained at 160 px, `--base darknet-tiny` one on another base, `--cold 5`
 * sets the number of fresh isolates. `--many` benchmarks one base serving many models instead (bench/edge-many.ts),
 * `--answers` the calibrated answer against none (bench/edge-answers.ts; `--whole`: both as whole models).
 */
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import sharp from "sharp";
import { type EdgeWorker, startEdgeWorker } from "../infra/local/edge-worker.ts";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { sampleDataset } from "../jobs/train/src/dataset/sample.ts";
import { writeCaptureConfig } from "../jobs/train/src/traffic/traffic.ts";
import { arg, BENCH_BASE, hasShared, machine, percentile, SHARED } from "./common.ts";
import { trainSampleModel } from "./sample-model.ts";

if (process.argv.includes("--many")) {
  await import("./edge-many.ts");
  process.exit(0);
}
if (process.argv.includes("--answers")) {
  await import("./edge-answers.ts");
  process.exit(0);
}
const size = Number(arg("size", "224")) as 224;
const coldRuns = Number(arg("cold", "5"));
const base = arg("base", BENCH_BASE) as string;
const requests = Number(arg("requests", "200"));
const s3 = await startLocalS3();
await trainSampleModel(s3.store, { base, imageSize: size });

// A real photo at the model's size, as a client that resizes before upload would send it.
const photo = hasShared("photos", "tfjs-models", "mobilenet_demo_coffee.jpg")
  ? await readFile(join(SHARED, "photos", "tfjs-models", "mobilenet_demo_coffee.jpg"))
  : Buffer.from((await sampleDataset({ perLabel: 1, size: 512 }))[0]?.bytes ?? []);
const jpeg = new Uint8Array(await sharp(photo).resize(size, size, { fit: "cover" }).jpeg({ quality: 90 }).toBuffer());
const big = new Uint8Array(await sharp(photo).resize(4000, 3000, { fit: "fill" }).jpeg({ quality: 90 }).toBuffer());

// The 12 MP measurement needs the pixel limit (and the body limit) above their defaults (2.1 MP, 4 MiB).
const workerOptions = { s3Endpoint: s3.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 3600, vars: { MAX_IMAGE_PIXELS: "16000000" } };
const classify = async (edge: EdgeWorker, body: Uint8Array) => {
  const t = performance.now();
  const res = await fetch(`${edge.url}/v1/models/bench/classify`, {
    method: "POST",
    headers: { authorization: `Bearer ${edge.apiKey}`, "content-type": "image/jpeg" },
    body: body as BodyInit,
  });
  const json = (await res.json()) as { timings?: Record<string, number>; error?: unknown };
  if (res.status !== 200) throw new Error(`classify: ${res.status} ${JSON.stringify(json)}`);
  return { ms: performance.now() - t, timings: json.timings as Record<string, number> };
};

const { execSync } = await import("node:child_process"); // a static import would sort above this file's doc comment

// Cold starts: a fresh isolate each time; first with an empty Cache API (the first isolate of a
// location), then with the verified model bytes already in the location's cache (every later one).
type Cold = { firstMs: number; fetchMs: number; parseMs: number; warmupMs: number; inferenceMs: number };
const coldLoad = loadavg()[0] as number;
const coldStart = async (persistTo?: string): Promise<Cold> => {
  const edge = await startEdgeWorker({ ...workerOptions, persistTo });
  try {
    const first = await classify(edge, jpeg);
    const desc = (await (await fetch(`${edge.url}/v1/models/bench`, { headers: { authorization: `Bearer ${edge.apiKey}` } })).json()) as {
      load: { fetchMs: number; parseMs: number; warmupMs: number };
    };
    return { firstMs: first.ms, ...desc.load, inferenceMs: first.timings.inferenceMs as number };
  } finally {
    await edge.stop();
  }
};
const cold: Cold[] = [];
for (let i = 0; i < coldRuns; i++) cold.push(await coldStart());
const location = await mkdtemp(join(tmpdir(), "edgetune-bench-cache-"));
await coldStart(location); // fills the location's cache
const coldCached: Cold[] = [];
for (let i = 0; i < coldRuns; i++) coldCached.push(await coldStart(location));
await rm(location, { recursive: true, force: true });

/** Ten warm-up requests, then `requests` timed ones: client-side, the worker's total, its inference. */
const warmRun = async (worker: EdgeWorker) => {
  for (let i = 0; i < 10; i++) await classify(worker, jpeg);
  const run = { e2e: [] as number[], total: [] as number[], inference: [] as number[] };
  for (let i = 0; i < requests; i++) {
    const r = await classify(worker, jpeg);
    run.e2e.push(r.ms);
    run.total.push(r.timings.totalMs as number);
    run.inference.push(r.timings.inferenceMs as number);
  }
  return run;
};

// Warm latency, then memory around a 12 MP JPEG.
const edge = await startEdgeWorker(workerOptions);
const { e2e, inference: server, total: serverTotal } = await warmRun(edge);
// Traffic capture on, every answer stored (a PNG encoded from the pixels), the same requests.
await writeCaptureConfig(s3.store, "bench", { enabled: true, belowConfidence: 1.01, maxPerDay: 1_000_000 });
const capturing = await startEdgeWorker(workerOptions);
const { e2e: e2eCapture, total: serverCapture, inference: inferenceCapture } = await warmRun(capturing);
const captureStats = (
  (await (await fetch(`${capturing.url}/healthz`, { headers: { authorization: `Bearer ${capturing.apiKey}` } })).json()) as { capture: Record<string, number> }
).capture;
await capturing.stop();
await writeCaptureConfig(s3.store, "bench", { enabled: false });
const before = edge.memoryMb();
const bigResult = await classify(edge, big);
const after = edge.memoryMb();
// A second one: does the isolate keep what the first one grew, or was it released?
await classify(edge, big);
const afterSecond = edge.memoryMb();
await edge.stop();

const bare = await startEdgeWorker({ ...workerOptions, config: "bench/edge/wrangler.jsonc" });
const bareRes = (await (await fetch(`${bare.url}/?model=bench&n=${requests}`)).json()) as { times: number[]; kernels: Record<string, number> };
await bare.stop();
await s3.stop();

const sorted = (a: number[]) => [...a].sort((x, y) => x - y);
const e2eS = sorted(e2e);
const bareS = sorted(bareRes.times);
const serverS = sorted(server);
const fmt = (a: number[]) => `${percentile(a, 50).toFixed(1)} / ${percentile(a, 95).toFixed(1)} / ${percentile(a, 99).toFixed(1)} ms`;
const commit = execSync("git describe --always --dirty", { encoding: "utf8" }).trim();
console.log(
  `Edge worker in local workerd, model trained at ${size} px (base ${base}, BN folded, float16), ${requests} sequential requests (${machine()}; commit ${commit}; load average ${loadavg()
    .map((l) => l.toFixed(2))
    .join(" ")} at the end)\n`,
);
console.log("| measurement | p50 / p95 / p99 |\n|---|---|");
console.log(`| end-to-end classify of a ${size}×${size} JPEG (client-side: HTTP + decode + preprocess + inference + JSON) | ${fmt(e2eS)} |`);
console.log(`| inside the worker: whole request (Server-Timing total: body, decode, preprocess, inference) | ${fmt(sorted(serverTotal))} |`);
console.log(`| inside the worker: inference (Server-Timing) | ${fmt(serverS)} |`);
console.log(`\nworker total p50 / bare inference p50: ${(percentile(sorted(serverTotal), 50) / percentile(bareS, 50)).toFixed(2)}`);
console.log(`| bare inference of the same weights in workerd | ${fmt(bareS)} |`);
console.log(`| with traffic capture storing every answer: end-to-end | ${fmt(sorted(e2eCapture))} |`);
console.log(`| with traffic capture storing every answer: inside the worker | ${fmt(sorted(serverCapture))} |`);
console.log(`| with traffic capture storing every answer: inference | ${fmt(sorted(inferenceCapture))} |`);
console.log(
  `\ncapture on / off, p50: end-to-end ${(percentile(sorted(e2eCapture), 50) / percentile(e2eS, 50)).toFixed(2)}, inside the worker ${(percentile(sorted(serverCapture), 50) / percentile(sorted(serverTotal), 50)).toFixed(2)} (capture: ${JSON.stringify(captureStats)})`,
);
console.log(
  `\nend-to-end p50 / bare inference p50: ${(percentile(e2eS, 50) / percentile(bareS, 50)).toFixed(2)} (overhead ${((percentile(e2eS, 50) / percentile(bareS, 50) - 1) * 100).toFixed(0)} %)`,
);
console.log(
  `where inference time goes (one inference, ms per kernel): ${Object.entries(bareRes.kernels)
    .map(([k, v]) => `${k} ${v.toFixed(1)}`)
    .join(", ")}`,
);
console.log(
  `\n| cold start (fresh isolate; load average ${coldLoad.toFixed(2)} before) | first classify | model fetch | parse | warm-up | first inference |\n|---|---|---|---|---|---|`,
);
const row = (label: string, c: Cold) =>
  `| ${label} | ${c.firstMs.toFixed(0)} ms | ${c.fetchMs.toFixed(0)} ms | ${c.parseMs.toFixed(0)} ms | ${c.warmupMs.toFixed(0)} ms | ${c.inferenceMs.toFixed(0)} ms |`;
const medianOf = (runs: Cold[]): Cold => {
  const m = (k: keyof Cold) => percentile(sorted(runs.map((c) => c[k])), 50);
  return { firstMs: m("firstMs"), fetchMs: m("fetchMs"), parseMs: m("parseMs"), warmupMs: m("warmupMs"), inferenceMs: m("inferenceMs") };
};
for (const c of cold) console.log(row("run, empty cache", c));
for (const c of coldCached) console.log(row("run, model in the location's cache", c));
console.log(row(`median of ${cold.length}, empty cache`, medianOf(cold)));
console.log(row(`median of ${coldCached.length}, cache warm`, medianOf(coldCached)));
console.log(
  `\n12 MP JPEG (4000×3000, ${(big.byteLength / 1e6).toFixed(1)} MB): classify ${bigResult.ms.toFixed(0)} ms (decode ${bigResult.timings.decodeMs} ms); workerd RSS ${before.rss.toFixed(0)} → ${after.rss.toFixed(0)} MB (→ ${afterSecond.rss.toFixed(0)} MB after a second one), peak RSS ${before.peak.toFixed(0)} → ${afterSecond.peak.toFixed(0)} MB (whole process: runtime + isolate)`,
);
