#!/usr/bin/env node
import { readPointer, writePointer } from "#shared/artifacts.ts";
/**
 * `npm run bench:load` — a bounded load test of the edge worker in local workerd (loopback only):
 * C concurrent clients send N classify requests in total; in the middle of the run the model's
 * pointer moves to a new version (a hot swap). Reports errors (goal: none), latency percentiles, and
 * which versions answered before and after the swap.
 */
import { startEdgeWorker } from "../infra/local/edge-worker.ts";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { sampleDataset } from "../jobs/train/src/dataset/sample.ts";
import { createLogger } from "../jobs/train/src/log.ts";
import { train } from "../jobs/train/src/train.ts";
import { arg, machine, percentile } from "./common.ts";

const total = Number(arg("requests", "600"));
const clients = Number(arg("clients", "8"));
const size = Number(arg("size", "160")) as 160;
const s3 = await startLocalS3();
const log = createLogger({ json: true, quiet: true, stream: { write: () => true } as unknown as NodeJS.WriteStream });
const images = await sampleDataset({ perLabel: 12, size: 128 });
for (const i of images) await s3.store.put(`datasets/load/${i.file}`, i.bytes);
await s3.store.put("datasets/load/manifest.json", "{}");
const v1 = await train(s3.store, { dataset: "load", imageSize: size, views: 1, head: { epochs: 5 }, promote: "always" }, log);
const p1 = await readPointer(s3.store, "load");
for (const i of await sampleDataset({ perLabel: 3, offset: 1, size: 128 })) await s3.store.put(`datasets/load/${i.file}`, i.bytes);
const v2 = await train(s3.store, { dataset: "load", imageSize: size, views: 1, head: { epochs: 5 }, promote: "always" }, log);
const p2 = await readPointer(s3.store, "load");
if (!p1 || !p2 || v1.version === v2.version) throw new Error("expected two versions");
const [first, second] = [p1, p2];
await writePointer(s3.store, "load", { ...p1, promotedAt: new Date().toISOString() }); // serve v1 first

const edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 1 });
const bodies = images.slice(0, 12);
let sent = 0;
let swappedAt = Number.POSITIVE_INFINITY;
const results: { ms: number; status: number; version?: string; at: number }[] = [];
const started = performance.now();
async function client() {
  while (sent < total) {
    const n = sent++;
    if (n === Math.floor(total * 0.4)) {
      swappedAt = performance.now();
      void writePointer(s3.store, "load", { ...second, promotedAt: new Date().toISOString(), previous: first.version, reason: "load test hot swap" });
    }
    const img = bodies[n % bodies.length] as (typeof bodies)[number];
    const t = performance.now();
    try {
      const res = await fetch(`${edge.url}/v1/models/load/classify`, {
        method: "POST",
        headers: { authorization: `Bearer ${edge.apiKey}`, "content-type": img.file.endsWith(".jpg") ? "image/jpeg" : "image/png" },
        body: img.bytes as BodyInit,
      });
      const json = (await res.json()) as { version?: string };
      results.push({ ms: performance.now() - t, status: res.status, version: json.version, at: t });
    } catch {
      results.push({ ms: performance.now() - t, status: 0, at: t });
    }
  }
}
await Promise.all(Array.from({ length: clients }, client));
const wall = (performance.now() - started) / 1000;
await edge.stop();
await s3.stop();

const errors = results.filter((r) => r.status !== 200);
const lat = results.map((r) => r.ms).sort((a, b) => a - b);
const after = results.filter((r) => r.at > swappedAt + 3000);
const count = (rs: typeof results, v: string) => rs.filter((r) => r.version === v).length;
console.log(`Load test: ${total} classify requests from ${clients} concurrent clients on loopback, ${size} px model, one hot swap at 40 % (${machine()})\n`);
console.log("| measurement | value |\n|---|---|");
console.log(`| requests / errors (non-200 or failed) | ${results.length} / ${errors.length} |`);
console.log(`| throughput | ${(results.length / wall).toFixed(1)} requests/s over ${wall.toFixed(1)} s |`);
console.log(
  `| latency p50 / p95 / p99 / max | ${percentile(lat, 50).toFixed(0)} / ${percentile(lat, 95).toFixed(0)} / ${percentile(lat, 99).toFixed(0)} / ${(lat.at(-1) ?? 0).toFixed(0)} ms |`,
);
console.log(`| answered by ${v1.version} (before) / ${v2.version} (after) | ${count(results, v1.version)} / ${count(results, v2.version)} |`);
console.log(`| requests more than 3 s after the swap served by the old version | ${after.length - count(after, v2.version)} of ${after.length} |`);
if (errors.length > 0) process.exitCode = 1;
