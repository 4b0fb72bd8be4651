#!/usr/bin/env node
/**
 * `npm run bench:retrain` — what a retrain costs after 10 % new images, against the first training,
 * in one run: train on 90 % of a dataset, add the other 10 %, train again; compare wall times.
 * Dataset: flowers128 from ../shared/data (or the bundled Twemoji sample if absent).
 */
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { sha256Hex } from "#shared/hash.ts";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { sampleDataset } from "../jobs/train/src/dataset/sample.ts";
import { createLogger } from "../jobs/train/src/log.ts";
import { initBackend } from "../jobs/train/src/model/backend.ts";
import { ensureBase } from "../jobs/train/src/model/bases.ts";
import { train } from "../jobs/train/src/train.ts";
import { arg, BENCH_BASE, hasShared, machine, SHARED } from "./common.ts";

const size = Number(arg("size", "160")) as 160;
const backend = await initBackend();
const s3 = await startLocalS3();
await ensureBase(s3.store, BENCH_BASE);

const files: { key: string; bytes: Uint8Array }[] = [];
let source: string;
if (hasShared("data", "flowers128")) {
  source = "flowers128 (4317 images, 5 labels)";
  for (const label of await readdir(join(SHARED, "data", "flowers128"))) {
    for (const f of await readdir(join(SHARED, "data", "flowers128", label)))
      files.push({ key: `${label}/${f}`, bytes: await readFile(join(SHARED, "data", "flowers128", label, f)) });
  }
} else {
  source = "Twemoji sample (3 labels)";
  for (const i of await sampleDataset({ perLabel: 60, size: 128 })) files.push({ key: i.file, bytes: i.bytes });
}
// A seeded 90/10 split of the files: the 10 % arrive later.
const ranked = await Promise.all(files.map(async (f) => ({ f, r: await sha256Hex(`retrain:${f.key}`) })));
ranked.sort((a, b) => a.r.localeCompare(b.r));
const later = new Set(ranked.slice(0, Math.round(files.length * 0.1)).map((x) => x.f.key));
const log = createLogger({ json: true, quiet: true, stream: { write: () => true } as unknown as NodeJS.WriteStream });

async function upload(subset: typeof files) {
  for (let i = 0; i < subset.length; i += 32) await Promise.all(subset.slice(i, i + 32).map((f) => s3.store.put(`datasets/bench/${f.key}`, f.bytes)));
  await s3.store.put("datasets/bench/manifest.json", JSON.stringify({ schemaVersion: 1, note: String(Date.now()) }));
}

await upload(files.filter((f) => !later.has(f.key)));
let t = performance.now();
const first = await train(s3.store, { dataset: "bench", imageSize: size }, log);
const firstSeconds = (performance.now() - t) / 1000;
await upload(files.filter((f) => later.has(f.key)));
t = performance.now();
const second = await train(s3.store, { dataset: "bench", imageSize: size }, log);
const secondSeconds = (performance.now() - t) / 1000;
await s3.stop();

const phases = (r: typeof first) => (r.report?.phases ?? []).map((p) => `${p.name} ${p.seconds.toFixed(1)} s`).join(", ");
console.log(`Retraining after 10 % new images — ${source}, ${size} px, base ${BENCH_BASE}, head strategy, backend ${backend.name} (${machine()})\n`);
console.log("| run | images | wall | phases |\n|---|---|---|---|");
console.log(`| first training | ${files.length - later.size} | ${firstSeconds.toFixed(1)} s | ${phases(first)} |`);
console.log(`| retrain (+${later.size}) | ${files.length} | ${secondSeconds.toFixed(1)} s | ${phases(second)} |`);
console.log(
  `\nretrain / first training: ${(secondSeconds / firstSeconds).toFixed(3)} (accuracy ${((first.accuracy ?? 0) * 100).toFixed(1)} % → ${((second.accuracy ?? 0) * 100).toFixed(1)} %)`,
);
