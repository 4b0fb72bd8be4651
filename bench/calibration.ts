#!/usr/bin/env node
/**
 * `npm run bench:calibration` — what an answer of the default configuration is worth, on the three
 * reference datasets in ../shared/data: expected calibration error on each held-out split (before and
 * after temperature scaling, cross-fitted), out-of-distribution AUROC (each dataset's model shown the
 * other two datasets' images, rejection score 1 − the top label's score) without and with a
 * none-of-these folder, and accuracy on the answered held-out images (per-label thresholds) against top-1.
 *
 * The none-of-these folder of a dataset is drawn from the other two datasets (`--none-per-dataset`
 * images of each), and their out-of-distribution test images (`--ood-per-dataset` of each) are other
 * images of the same datasets, never the ones in the folder. Scores come from the exported model,
 * end to end (decode, preprocess, the model the edge loads). `--held-out-max` caps the in-distribution
 * held-out images scored end to end (ECE and the answered share come from the training run, on all of them).
 * Results: bench/results/calibration.jsonl (appended) and a markdown table on stdout.
 */
import { appendFile, readdir, readFile } from "node:fs/promises";
import { join, relative, sep } from "node:path";
import * as tf from "@tensorflow/tfjs";
import { answer } from "#shared/answer.ts";
import { readPromotedModel } from "#shared/artifacts.ts";
import type { ArtifactMetadata } from "#shared/contracts/artifact.ts";
import { preprocess } from "#shared/preprocess.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { pushDataset } from "../jobs/train/src/catalog/catalog.ts";
import { mulberry32 } from "../jobs/train/src/dataset/augment.ts";
import { decodeImage } from "../jobs/train/src/dataset/decode.ts";
import { readDataset } from "../jobs/train/src/dataset/read.ts";
import { expectedCalibrationError } from "../jobs/train/src/fit/calibrate.ts";
import { createLogger } from "../jobs/train/src/log.ts";
import { initBackend } from "../jobs/train/src/model/backend.ts";
import { loadModel } from "../jobs/train/src/model/io.ts";
import { train } from "../jobs/train/src/train.ts";
import { arg, hasShared, machine, SHARED } from "./common.ts";

const DATASETS = ["hymenoptera_data", "cats_and_dogs_filtered", "flowers128"];
const datasets = (arg("datasets") ?? DATASETS.join(",")).split(",");
const oodPer = Number(arg("ood-per-dataset", "250"));
const nonePer = Number(arg("none-per-dataset", "200"));
const heldOutMax = Number(arg("held-out-max", "400"));
const IMAGE = /\.(jpe?g|png|webp|gif)$/i;
const NONE = "_none";

if (!hasShared("data")) {
  console.log("../shared/data is absent: nothing to benchmark.");
  process.exit(0);
}

/** Every image file of a local dataset folder, in a seeded order. */
async function shuffledImages(dir: string, seed: number): Promise<string[]> {
  const files = (await readdir(dir, { recursive: true })).filter((f) => IMAGE.test(f)).sort();
  const rand = mulberry32(seed);
  for (let i = files.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [files[i], files[j]] = [files[j] as string, files[i] as string];
  }
  return files.map((f) => join(dir, f));
}

/** Mann–Whitney AUROC: the chance that a random positive scores above a random negative (ties count half). */
function auroc(positives: readonly number[], negatives: readonly number[]): number {
  const all = [...positives.map((s) => ({ s, p: true })), ...negatives.map((s) => ({ s, p: false }))].sort((a, b) => a.s - b.s);
  let rankSum = 0;
  for (let i = 0; i < all.length; ) {
    let j = i;
    while (j < all.length && (all[j] as { s: number }).s === (all[i] as { s: number }).s) j++;
    const rank = (i + 1 + j) / 2; // mean rank of the tie group (1-based)
    for (let k = i; k < j; k++) if ((all[k] as { p: boolean }).p) rankSum += rank;
    i = j;
  }
  const np = positives.length;
  const nn = negatives.length;
  return (rankSum - (np * (np + 1)) / 2) / (np * nn);
}

/** The exported model's scores for image files or bucket keys, end to end as the edge computes them. */
async function scoresOf(model: tf.LayersModel, metadata: ArtifactMetadata, images: (() => Promise<Uint8Array>)[]): Promise<Float32Array[]> {
  const size = metadata.input.size;
  const out: Float32Array[] = [];
  for (let i = 0; i < images.length; i += 16) {
    const inputs = await Promise.all(images.slice(i, i + 16).map(async (read) => preprocess(await decodeImage(await read()), size, metadata.preprocessing)));
    const flat = new Float32Array(inputs.length * size * size * 3);
    for (const [k, x] of inputs.entries()) flat.set(x, k * x.length);
    const p = tf.tidy(() => model.predict(tf.tensor4d(flat, [inputs.length, size, size, 3])) as tf.Tensor2D);
    const data = (await p.data()) as Float32Array;
    const k = p.shape[1];
    p.dispose();
    for (let r = 0; r < inputs.length; r++) out.push(data.slice(r * k, (r + 1) * k));
  }
  return out;
}

interface Measured {
  dataset: string;
  none: boolean;
  version: string;
  accuracy: number;
  evaluatedOn: number;
  temperature: number;
  eceBefore: number;
  eceAfter: number;
  /**
   * The ECE a perfectly calibrated model would still show on this many held-out images with these
   * scores (each answer drawn right with probability its score, 200 draws): the estimate's noise floor.
   */
  eceFloor: number;
  answered: number;
  answeredAccuracy: number;
  /** With a none folder: share of its held-out images given no label (cross-fitted, from the run). */
  negativesRejected?: number;
  heldOutScored: number;
  oodScored: number;
  auroc: number;
  /** Share of foreign images answered unsure or none of these (not given a label). */
  oodRejected: number;
  /** Share of in-distribution held-out images (scored end to end) not given a label. */
  idRejected: number;
  seconds: number;
}

async function measure(store: ObjectStore, dataset: string, name: string, foreign: string[], withNone: boolean, trainSeconds: number): Promise<Measured> {
  const { metadata, files } = await readPromotedModel(store, name);
  const model = await loadModel(files.get("model.json") as Uint8Array, files);
  const d = await readDataset(store, name, { seed: 42, valFraction: 0.2 });
  const rand = mulberry32(7);
  const heldOut = d.images
    .filter((i) => i.split === "val" && i.label !== NONE)
    .map((i) => ({ i, r: rand() }))
    .sort((a, b) => a.r - b.r)
    .slice(0, heldOutMax)
    .map(({ i }) => i);
  const id = await scoresOf(
    model,
    metadata,
    heldOut.map((i) => async () => (await store.get(i.key)) as Uint8Array),
  );
  const ood = await scoresOf(
    model,
    metadata,
    foreign.map((f) => async () => new Uint8Array(await readFile(f))),
  );
  model.dispose();
  const noneIndex = metadata.noneLabel === undefined ? -1 : metadata.labels.indexOf(metadata.noneLabel);
  // Rejection score: what the labels do not claim (with a none class, its score is part of it).
  const rejection = (p: Float32Array) => 1 - Math.max(...Array.from(p).filter((_, c) => c !== noneIndex));
  const rejected = (p: Float32Array) => answer(p, metadata, { topK: 1 }).label === null;
  const share = (ps: Float32Array[]) => ps.filter(rejected).length / Math.max(1, ps.length);
  const c = metadata.calibration;
  const t = metadata.thresholds;
  const draws = mulberry32(11);
  let floor = 0;
  for (let k = 0; k < 200; k++) {
    const truth = id.map((p) => {
      const top = p.indexOf(Math.max(...p));
      return draws() < (p[top] as number) ? top : (top + 1) % p.length;
    });
    floor += expectedCalibrationError(id, truth) / 200;
  }
  return {
    dataset,
    none: withNone,
    version: metadata.version,
    accuracy: metadata.metrics.accuracy,
    evaluatedOn: metadata.metrics.evaluatedOn,
    temperature: c?.temperature ?? 1,
    eceBefore: c?.eceBefore ?? Number.NaN,
    eceAfter: c?.eceAfter ?? Number.NaN,
    eceFloor: floor,
    answered: t?.answered ?? Number.NaN,
    answeredAccuracy: t?.answeredAccuracy ?? Number.NaN,
    ...(t?.negativesRejected === undefined ? {} : { negativesRejected: t.negativesRejected }),
    heldOutScored: id.length,
    oodScored: ood.length,
    auroc: auroc(ood.map(rejection), id.map(rejection)),
    oodRejected: share(ood),
    idRejected: share(id),
    seconds: trainSeconds,
  };
}

await initBackend();
const s3 = await startLocalS3();
const log = createLogger({ json: true, quiet: true, stream: { write: () => true } as unknown as NodeJS.WriteStream });
const pools = new Map<string, { none: string[]; test: string[] }>();
for (const ds of DATASETS) {
  if (!hasShared("data", ds)) continue;
  const files = await shuffledImages(join(SHARED, "data", ds), 42);
  pools.set(ds, { none: files.slice(0, nonePer), test: files.slice(nonePer, nonePer + oodPer) });
}
const results: Measured[] = [];
for (const dataset of datasets) {
  const dir = join(SHARED, "data", dataset);
  if (!hasShared("data", dataset)) continue;
  const others = [...pools.keys()].filter((d) => d !== dataset);
  const foreign = others.flatMap((o) => pools.get(o)?.test ?? []);
  const negatives = others.flatMap((o) => pools.get(o)?.none ?? []);
  const base = dataset.replaceAll("_", "-");
  // Datasets with given split folders get their negatives split the same way (a fifth held out).
  const split = (await readdir(dir)).includes("train");
  const valFolder = (await readdir(dir)).find((f) => f === "val" || f === "validation") ?? "val";
  for (const withNone of [false, true]) {
    const name = withNone ? `${base}-none` : base;
    await pushDataset(s3.store, dir, name, withNone ? { noneLabel: NONE } : {}, undefined, {
      beforeManifest: withNone
        ? async () => {
            await Promise.all(
              negatives.map(async (f, i) => {
                const file = `${relative(SHARED, f).split(sep).join("-")}`;
                const folder = split ? `${i % 5 === 0 ? valFolder : "train"}/${NONE}` : NONE;
                await s3.store.put(`datasets/${name}/${folder}/${file}`, await readFile(f));
              }),
            );
          }
        : undefined,
    });
    const t0 = performance.now();
    // The default configuration: only the dataset is named (plus promote, so every run is measured).
    await train(s3.store, { dataset: name, promote: "always" }, log);
    const seconds = (performance.now() - t0) / 1000;
    const m = await measure(s3.store, dataset, name, foreign, withNone, seconds);
    results.push(m);
    await appendFile(
      join(import.meta.dirname, "results", "calibration.jsonl"),
      `${JSON.stringify({ date: new Date().toISOString(), ...m, oodPer, nonePer, machine: machine() })}\n`,
    );
    console.log(JSON.stringify(m));
  }
}
await s3.stop();
const pct = (v: number) => `${(v * 100).toFixed(1)} %`;
console.log(
  `\n| dataset | none folder | top-1 (n) | T | ECE before → after (floor) | answered · accuracy on answered | OOD AUROC (n) | foreign rejected · held-out rejected |\n|---|---|---|---|---|---|---|---|\n${results
    .map(
      (r) =>
        `| ${r.dataset} | ${r.none ? `yes (${nonePer} × 2)` : "no"} | ${pct(r.accuracy)} (${r.evaluatedOn}) | ${r.temperature.toFixed(2)} | ${r.eceBefore.toFixed(3)} → **${r.eceAfter.toFixed(3)}** (${r.eceFloor.toFixed(3)}) | ${pct(r.answered)} · ${pct(r.answeredAccuracy)} | **${r.auroc.toFixed(3)}** (${r.oodScored} vs ${r.heldOutScored}) | ${pct(r.oodRejected)} · ${pct(r.idRejected)} |`,
    )
    .join("\n")}`,
);
