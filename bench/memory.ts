#!/usr/bin/env node
/**
 * `npm run bench:memory` — the memory of one edge isolate against Workers' 128 MB: a fresh worker in
 * local workerd per pixel limit, then the model loaded, one image of each format at the limit (each
 * decoder keeps the wasm memory it grew to), and a burst of 50 concurrent requests at the limit (admission
 * control lets 1 in at a time and queues 16). Per step: the isolate's WebAssembly memories as the worker
 * reports them in /healthz (tfjs and each decoder: they only grow), the budget that adds the JS-side
 * worst case (a body of MAX_IMAGE_BYTES held, one decoded RGBA copy of the limit), and the workerd
 * process's RSS growth over the fresh isolate (which also holds compiled code and the runtime: an upper
 * bound, not what Workers count). `--pixels 1000000,2100000,8000000` (default) sets the limits compared side by side;
 * `--size 224` the model's input size, `--base <id>` its base (default: the default base).
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import sharp from "sharp";
import { type EdgeWorker, startEdgeWorker } from "../infra/local/edge-worker.ts";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { sampleDataset } from "../jobs/train/src/dataset/sample.ts";
import { arg, BENCH_BASE, hasShared, machine, SHARED } from "./common.ts";
import { trainSampleModel } from "./sample-model.ts";

const size = Number(arg("size", "224")) as 224;
const base = arg("base", BENCH_BASE) as string;
const limits = (arg("pixels", "1000000,2100000,8000000") as string).split(",").map(Number);
const burst = 50;
const s3 = await startLocalS3();
await trainSampleModel(s3.store, { base, imageSize: size });

const photoPath = join(SHARED, "photos", "tfjs-models", "mobilenet_demo_coffee.jpg");
const photo = hasShared("photos", "tfjs-models", "mobilenet_demo_coffee.jpg")
  ? readFileSync(photoPath)
  : Buffer.from((await sampleDataset({ perLabel: 1, size: 512 }))[0]?.bytes ?? []);

const wasm = async (edge: EdgeWorker) =>
  (
    (await (await fetch(`${edge.url}/healthz`, { headers: { authorization: `Bearer ${edge.apiKey}` } })).json()) as {
      memory: { wasm: { total: number; byModule: Record<string, number> } } | null;
    }
  ).memory?.wasm ?? {
    total: 0,
    byModule: {},
  };

const classify = (edge: EdgeWorker, body: Uint8Array, type: string) =>
  fetch(`${edge.url}/v1/models/bench/classify`, {
    method: "POST",
    headers: { authorization: `Bearer ${edge.apiKey}`, "content-type": type },
    body: body as BodyInit,
  }).then(async (res) => ({ status: res.status, body: await res.text() }));

const rows: string[] = [];
// The worker's defaults (wrangler.jsonc): bodies of up to 4 MiB, one held at a time.
const maxBytes = 4 * 1024 * 1024;
const concurrent = 1;
for (const limit of limits) {
  const side = Math.floor(Math.sqrt(limit));
  const base = sharp(photo).resize(side, side, { fit: "fill" });
  const images = {
    jpeg: new Uint8Array(await base.clone().jpeg({ quality: 92 }).toBuffer()),
    png: new Uint8Array(await base.clone().png({ compressionLevel: 9 }).toBuffer()),
    webp: new Uint8Array(await base.clone().webp({ quality: 90 }).toBuffer()),
    gif: new Uint8Array(await base.clone().gif().toBuffer()),
  };
  const edge = await startEdgeWorker({
    s3Endpoint: s3.endpoint,
    bucket: s3.config.bucket,
    pointerTtlSeconds: 3600,
    vars: { MAX_IMAGE_PIXELS: String(limit), MAX_IMAGE_BYTES: String(maxBytes) },
  });
  try {
    await fetch(`${edge.url}/healthz`);
    const start = edge.memoryMb();
    const steps: [string, { rss: number; peak: number }, string, { total: number; byModule: Record<string, number> }][] = [];
    const small = new Uint8Array(await sharp(photo).resize(size, size).jpeg().toBuffer());
    const first = await classify(edge, small, "image/jpeg");
    steps.push(["model loaded (first classify)", edge.memoryMb(), String(first.status), await wasm(edge)]);
    for (const [format, bytes] of Object.entries(images)) {
      const r = await classify(edge, bytes, `image/${format}`);
      steps.push([`${format} ${side}×${side} (${(bytes.byteLength / 1e6).toFixed(1)} MB)`, edge.memoryMb(), String(r.status), await wasm(edge)]);
    }
    const statuses = await Promise.all(Array.from({ length: burst }, () => classify(edge, images.jpeg, "image/jpeg").then((r) => r.status)));
    const counts = [...new Set(statuses)].map((s) => `${statuses.filter((x) => x === s).length}×${s}`).join(" ");
    steps.push([`${burst} concurrent JPEGs at the limit`, edge.memoryMb(), counts, await wasm(edge)]);
    // What JS holds besides the wasm memories, at worst: the bodies of the admitted requests (each up to
    // MAX_IMAGE_BYTES), and the decoded RGBA copy of one image at the limit (decoding runs one at a time).
    const jsWorst = concurrent * maxBytes + 4 * side * side;
    const mb = (b: number) => (b / 1024 / 1024).toFixed(0);
    for (const [step, m, status, w] of steps) {
      const modules = Object.entries(w.byModule)
        .map(([k, v]) => `${k} ${mb(v)}`)
        .join(", ");
      rows.push(
        `| ${(limit / 1e6).toFixed(1)} MP | ${step} | ${status} | ${mb(w.total)} MB (${modules}) | ${mb(w.total + jsWorst)} MB | +${(m.rss - start.rss).toFixed(0)} / +${(m.peak - start.rss).toFixed(0)} MB |`,
      );
    }
  } finally {
    await edge.stop();
  }
}
await s3.stop();

console.log(`Edge isolate memory, model trained at ${size} px on ${base} (${machine()})\n`);
console.log(
  "| pixel limit | step | HTTP | wasm memories (MB) | budget: wasm + 1 body + 1 decoded copy | workerd RSS growth / peak |\n|---|---|---|---|---|---|",
);
for (const r of rows) console.log(r);
console.log("\nBudget: Workers allow 128 MB per isolate (JS heap, wasm memories and buffers together).");
