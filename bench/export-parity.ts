#!/usr/bin/env node
/**
 * `npm run bench:export-parity` — the ONNX export (`edgetune export`) against the edge's own computation
 * (shared/preprocess.ts + the served tfjs model) on the reference datasets' held-out images in
 * ../shared/data (skipped without them): per dataset, a head trained with the defaults on
 * `--train-per-label` training images (30), exported, and every held-out image (hymenoptera val/,
 * cats_and_dogs validation/, every 5th flowers128 image, none of them trained on; `--max` caps them per
 * dataset) run by onnxruntime-node. `--base` and `--size` train another base or input size. Goal: the same top-1 for every image, probabilities within 1e-3.
 * Results: bench/results/export-parity.jsonl (appended) and a table on stdout.
 */
import { readdirSync, readFileSync } from "node:fs";
import { appendFile } from "node:fs/promises";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { decodeImage } from "../jobs/train/src/dataset/decode.ts";
import { onnxOf, readVersion } from "../jobs/train/src/export/export.ts";
import { modelInput } from "../jobs/train/src/export/input.ts";
import { checkParity, ortClassifier, type ParityImage } from "../jobs/train/src/export/parity.ts";
import { createLogger } from "../jobs/train/src/log.ts";
import { initBackend } from "../jobs/train/src/model/backend.ts";
import { loadModel } from "../jobs/train/src/model/io.ts";
import { train } from "../jobs/train/src/train.ts";
import { arg, hasShared, machine, SHARED } from "./common.ts";

/** Training and held-out folders (relative to the dataset) per label; null: one folder per label, every 5th file held out. */
const LAYOUT: Record<string, { train: string; heldOut: string } | null> = {
  hymenoptera_data: { train: "train", heldOut: "val" },
  cats_and_dogs_filtered: { train: "train", heldOut: "validation" },
  flowers128: null,
};
const perLabel = Number(arg("train-per-label", "30"));
const max = Number(arg("max", "100000"));
/** A base by name (default: the run's default); `--size` an input size. */
const base = arg("base");
const size = arg("size");

if (!hasShared("data")) {
  console.log("../shared/data is absent: nothing to benchmark.");
  process.exit(0);
}
await initBackend();
const s3 = await startLocalS3();
const log = createLogger({ json: true, quiet: true, stream: { write: () => true } as unknown as NodeJS.WriteStream });
const images = (dir: string) =>
  readdirSync(dir)
    .filter((f) => /\.(jpe?g|png)$/i.test(f))
    .sort();
const rows: string[] = [];
try {
  for (const [dataset, layout] of Object.entries(LAYOUT)) {
    if (!hasShared("data", dataset)) continue;
    const root = join(SHARED, "data", dataset);
    const labels = readdirSync(layout ? join(root, layout.train) : root).sort();
    const heldOut: { label: string; path: string }[] = [];
    const name = dataset.replaceAll("_", "-");
    for (const label of labels) {
      const trainDir = layout ? join(root, layout.train, label) : join(root, label);
      const all = images(trainDir);
      const trainFiles = (layout ? all : all.filter((_, i) => i % 5 !== 0)).slice(0, perLabel);
      await Promise.all(trainFiles.map((f) => s3.store.put(`datasets/${name}/${label}/${f}`, readFileSync(join(trainDir, f)))));
      const heldDir = layout ? join(root, layout.heldOut, label) : trainDir;
      const held = layout ? images(heldDir) : all.filter((_, i) => i % 5 === 0);
      heldOut.push(...held.map((f) => ({ label, path: join(heldDir, f) })));
    }
    await s3.store.put(`datasets/${name}/manifest.json`, "{}");
    await train(s3.store, { dataset: name, views: 1, promote: "always", ...(base ? { base } : {}), ...(size ? { imageSize: Number(size) as 160 } : {}) }, log);
    const version = await readVersion(s3.store, name);
    const t0 = performance.now();
    const onnx = await onnxOf(version);
    const exportMs = performance.now() - t0;
    const session = await ort.InferenceSession.create(onnx);
    const model = await loadModel(version.files.get("model.json") as Uint8Array, version.files);
    const { metadata } = version;
    // In slices, so the decoded pixels of thousands of photos are never held at once.
    const picked = heldOut.filter((_, i) => i < max);
    let differs: string[] = [];
    let maxDelta = 0;
    for (let i = 0; i < picked.length; i += 50) {
      const slice: ParityImage[] = await Promise.all(
        picked.slice(i, i + 50).map(async (h) => ({ name: h.path.slice(root.length + 1), pixels: await decodeImage(new Uint8Array(readFileSync(h.path))) })),
      );
      const p = await checkParity(ortClassifier(ort, session, metadata.input.size), model, metadata, slice, (px) =>
        modelInput(px, metadata.input.size, metadata.preprocessing),
      );
      differs = differs.concat(p.top1Differs);
      maxDelta = Math.max(maxDelta, p.maxDelta);
    }
    await session.release();
    model.dispose();
    const result = {
      date: new Date().toISOString(),
      machine: machine(),
      dataset,
      base: metadata.base.id,
      size: metadata.input.size,
      heldOut: picked.length,
      top1Same: picked.length - differs.length,
      differs,
      maxDelta,
      exportMs: Math.round(exportMs),
      onnxBytes: onnx.byteLength,
      edgeBytes: metadata.files.filter((f) => version.files.has(f.path)).reduce((n, f) => n + f.bytes, 0),
    };
    await appendFile(join(import.meta.dirname, "results", "export-parity.jsonl"), `${JSON.stringify(result)}\n`);
    rows.push(
      `| ${dataset} | ${result.base} ${result.size} px | ${result.top1Same}/${result.heldOut} | ${maxDelta.toExponential(1)} | ${result.exportMs} ms | ${(result.onnxBytes / result.edgeBytes).toFixed(2)} × |`,
    );
  }
} finally {
  await s3.stop();
}
console.log(`# ${machine()}\n| dataset | base | same top-1 | max abs. Δp | conversion | ONNX / edge files |\n|---|---|---|---|---|---|\n${rows.join("\n")}`);
