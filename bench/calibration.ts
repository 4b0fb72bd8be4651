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
 * Besides max-softmax, candidate rejection scores computed from the model's pooled features and logits
 * (bench/ood-scores.ts, fitted on up to `--train-max` training images) are compared side by side: AUROC
 * overall and per foreign dataset, and the foreign share each rejects at a threshold rejecting 5 % of the
 * held-out. The ECE's noise floor (a perfectly calibrated model's ECE on these images: mean and 95th
 * percentile of 200 draws) and a bootstrap interval of the end-to-end ECE say what the split can show.
 * Results: bench/results/calibration.jsonl (appended) and markdown tables on stdout.
 */
import { appendFile, readdir, readFile } from "node:fs/promises";
import { join, relative, sep } from "node:path";
import * as tf from "@tensorflow/tfjs";
import sharp from "sharp";
import { answer } from "#shared/answer.ts";
import { readPromotedModel } from "#shared/artifacts.ts";
import type { ArtifactMetadata } from "#shared/contracts/artifact.ts";
import { similarity, versionClassMeans } from "#shared/novelty.ts";
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
import { auroc } from "../jobs/train/src/release/ood.ts";
import { train } from "../jobs/train/src/train.ts";
import { arg, hasShared, machine, SHARED } from "./common.ts";
import { fitScores, probeModel, rejectedAt, SCORES, type Scored, type ScoreName } from "./ood-scores.ts";

const DATASETS = ["hymenoptera_data", "cats_and_dogs_filtered", "flowers128"];
const datasets = (arg("datasets") ?? DATASETS.join(",")).split(",");
const oodPer = Number(arg("ood-per-dataset", "250"));
const nonePer = Number(arg("none-per-dataset", "200"));
const heldOutMax = Number(arg("held-out-max", "400"));
const trainMax = Number(arg("train-max", "800"));
/**
 * `--foreign-as 128`: foreign images re-encoded as 128×128 JPEGs (centre crop) before scoring, as
 * flowers128's own images are, so a score cannot tell them apart by resolution or compression alone.
 */
const foreignAs = arg("foreign-as") === undefined ? undefined : Number(arg("foreign-as"));
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

/** The exported model's features, logits and scores for image files or bucket keys, end to end as the edge computes them. */
async function scoresOf(model: tf.LayersModel, metadata: ArtifactMetadata, images: (() => Promise<Uint8Array>)[]): Promise<Scored[]> {
  const size = metadata.input.size;
  const run = probeModel(model);
  const out: Scored[] = [];
  for (let i = 0; i < images.length; i += 16) {
    const inputs = await Promise.all(images.slice(i, i + 16).map(async (read) => preprocess(await decodeImage(await read()), size, metadata.preprocessing)));
    const flat = new Float32Array(inputs.length * size * size * 3);
    for (const [k, x] of inputs.entries()) flat.set(x, k * x.length);
    const x = tf.tensor4d(flat, [inputs.length, size, size, 3]);
    out.push(...(await run(x)));
    x.dispose();
  }
  return out;
}

/** A seeded sample of at most `max` images. */
function sample<T>(items: readonly T[], max: number, seed: number): T[] {
  const rand = mulberry32(seed);
  return items
    .map((i) => ({ i, r: rand() }))
    .sort((a, b) => a.r - b.r)
    .slice(0, max)
    .map(({ i }) => i);
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
  /**
   * The 95th percentile of those 200 draws: an ECE measured above it is more than noise (a model
   * calibrated perfectly would measure that much in fewer than 1 in 20 held-out splits of this size).
   */
  eceFloor95: number;
  answered: number;
  answeredAccuracy: number;
  /** With a none folder: share of its held-out images given no label (cross-fitted, from the run). */
  negativesRejected?: number;
  heldOutScored: number;
  oodScored: number;
  auroc: number;
  /**
   * Each candidate rejection score (bench/ood-scores.ts; fitted on up to `--train-max` training images):
   * its AUROC, and the share of foreign images it rejects at the threshold that rejects 5 % of the held-out.
   */
  scores: Record<ScoreName, { auroc: number; rejectedAt5: number }>;
  /**
   * The same AUROCs per foreign dataset. flowers128's images are 128 px (upscaled to the model's size),
   * the others' are photos of 250–500 px (downscaled): a feature score may tell them apart by that alone.
   */
  bySource: Record<string, Record<ScoreName, number>>;
  /** ECE of the held-out images scored end to end, with a 95 % bootstrap interval (1000 resamples). */
  eceEndToEnd: { ece: number; low: number; high: number; n: number };
  /** Share of foreign images answered unsure or none of these (not given a label). */
  oodRejected: number;
  /** Share of in-distribution held-out images (scored end to end) not given a label. */
  idRejected: number;
  seconds: number;
}

async function measure(
  store: ObjectStore,
  dataset: string,
  name: string,
  foreign: { file: string; source: string }[],
  withNone: boolean,
  trainSeconds: number,
): Promise<Measured> {
  const { metadata, files } = await readPromotedModel(store, name);
  const model = await loadModel(files.get("model.json") as Uint8Array, files);
  const means = versionClassMeans(metadata, files);
  const d = await readDataset(store, name, { seed: 42, valFraction: 0.2 });
  const heldOut = sample(
    d.images.filter((i) => i.split === "val" && i.label !== NONE),
    heldOutMax,
    7,
  );
  const trainImages = sample(
    d.images.filter((i) => i.split === "train"),
    trainMax,
    8,
  );
  const fitOn = await scoresOf(
    model,
    metadata,
    trainImages.map((i) => async () => (await store.get(i.key)) as Uint8Array),
  );
  const idScored = await scoresOf(
    model,
    metadata,
    heldOut.map((i) => async () => (await store.get(i.key)) as Uint8Array),
  );
  const oodScored = await scoresOf(
    model,
    metadata,
    foreign.map((f) => async () => {
      const bytes = await readFile(f.file);
      if (foreignAs === undefined) return new Uint8Array(bytes);
      return new Uint8Array(await sharp(bytes).resize(foreignAs, foreignAs, { fit: "cover" }).jpeg({ quality: 90 }).toBuffer());
    }),
  );
  model.dispose();
  const id = idScored.map((s) => s.probs);
  const ood = oodScored.map((s) => s.probs);
  const noneIndex = metadata.noneLabel === undefined ? -1 : metadata.labels.indexOf(metadata.noneLabel);
  // Rejection score: what the labels do not claim (with a none class, its score is part of it).
  const rejection = (p: Float32Array) => 1 - Math.max(...Array.from(p).filter((_, c) => c !== noneIndex));
  // The version's own answer: its thresholds, its rejection class, its novelty floor on the features.
  const rejected = (s: Scored) =>
    answer({ scores: s.probs, ...(means ? { similarity: similarity(s.features, means) } : {}) }, metadata, { topK: 1 }).label === null;
  const share = (ss: Scored[]) => ss.filter(rejected).length / Math.max(1, ss.length);
  const real = metadata.labels.map((_, c) => c).filter((c) => c !== noneIndex);
  const candidate = fitScores(
    fitOn,
    trainImages.map((i) => metadata.labels.indexOf(i.label)),
    real,
    means,
  );
  const idCandidates = idScored.map(candidate);
  const oodCandidates = oodScored.map(candidate);
  const scores = Object.fromEntries(
    SCORES.map((name) => {
      const a = idCandidates.map((s) => s[name]);
      const b = oodCandidates.map((s) => s[name]);
      return [name, { auroc: auroc(b, a), rejectedAt5: rejectedAt(a, b) }];
    }),
  ) as Measured["scores"];
  const bySource: Measured["bySource"] = {};
  for (const source of new Set(foreign.map((f) => f.source))) {
    const rows = oodCandidates.filter((_, i) => foreign[i]?.source === source);
    bySource[source] = Object.fromEntries(
      SCORES.map((n) => [
        n,
        auroc(
          rows.map((s) => s[n]),
          idCandidates.map((s) => s[n]),
        ),
      ]),
    ) as Record<ScoreName, number>;
  }
  const truthOf = heldOut.map((i) => metadata.labels.indexOf(i.label));
  const boot = mulberry32(13);
  const resampled = Array.from({ length: 1000 }, () => {
    const rows = id.map(() => Math.floor(boot() * id.length));
    return expectedCalibrationError(
      rows.map((r) => id[r] as Float32Array),
      rows.map((r) => truthOf[r] as number),
    );
  }).sort((a, b) => a - b);
  const eceEndToEnd = { ece: expectedCalibrationError(id, truthOf), low: resampled[24] as number, high: resampled[974] as number, n: id.length };
  const c = metadata.calibration;
  const t = metadata.thresholds;
  const draws = mulberry32(11);
  const floors = Array.from({ length: 200 }, () => {
    const truth = id.map((p) => {
      const top = p.indexOf(Math.max(...p));
      return draws() < (p[top] as number) ? top : (top + 1) % p.length;
    });
    return expectedCalibrationError(id, truth);
  }).sort((a, b) => a - b);
  const floor = floors.reduce((a, e) => a + e, 0) / floors.length;
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
    eceFloor95: floors[189] as number,
    answered: t?.answered ?? Number.NaN,
    answeredAccuracy: t?.answeredAccuracy ?? Number.NaN,
    ...(t?.negativesRejected === undefined ? {} : { negativesRejected: t.negativesRejected }),
    heldOutScored: id.length,
    oodScored: ood.length,
    auroc: auroc(ood.map(rejection), id.map(rejection)),
    scores,
    bySource,
    eceEndToEnd,
    oodRejected: share(oodScored),
    idRejected: share(idScored),
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
  const foreign = others.flatMap((o) => (pools.get(o)?.test ?? []).map((file) => ({ file, source: o })));
  const negatives = others.flatMap((o) => pools.get(o)?.none ?? []);
  const base = dataset.replaceAll("_", "-");
  // Datasets with given split folders get their negatives split the same way (a fifth held out).
  const split = (await readdir(dir)).includes("train");
  const valFolder = (await readdir(dir)).find((f) => f === "val" || f === "validation") ?? "val";
  for (const withNone of arg("none") === "no" ? [false] : [false, true]) {
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
      `${JSON.stringify({ date: new Date().toISOString(), ...m, oodPer, nonePer, ...(foreignAs ? { foreignAs } : {}), machine: machine() })}\n`,
    );
    console.log(JSON.stringify(m));
  }
}
await s3.stop();
const pct = (v: number) => `${(v * 100).toFixed(1)} %`;
console.log(
  `\n| dataset | none folder | top-1 (n) | T | ECE before → after (ECE noise floor) | answered · accuracy on answered | OOD AUROC: max-softmax · novelty (n) | foreign rejected · held-out rejected (the version's answer) |\n|---|---|---|---|---|---|---|---|\n${results
    .map(
      (r) =>
        `| ${r.dataset} | ${r.none ? `yes (${nonePer} × 2)` : "no"} | ${pct(r.accuracy)} (${r.evaluatedOn}) | ${r.temperature.toFixed(2)} | ${r.eceBefore.toFixed(3)} → **${r.eceAfter.toFixed(3)}** (floor ${r.eceFloor.toFixed(3)}, 95th pct ${r.eceFloor95.toFixed(3)}) | ${pct(r.answered)} · ${pct(r.answeredAccuracy)} | ${r.auroc.toFixed(3)} · **${r.scores.novelty.auroc.toFixed(3)}** (${r.oodScored} vs ${r.heldOutScored}) | ${pct(r.oodRejected)} · ${pct(r.idRejected)} |`,
    )
    .join("\n")}`,
);
console.log(
  `\n| dataset | none folder | ${SCORES.map((n) => `${n}: AUROC · foreign rejected at 5 % held-out rejected`).join(" | ")} | ECE end to end [95 % CI] (n) |\n|---|---|${SCORES.map(() => "---|").join("")}---|\n${results
    .map(
      (r) =>
        `| ${r.dataset} | ${r.none ? "yes" : "no"} | ${SCORES.map((n) => `${r.scores[n].auroc.toFixed(3)} · ${pct(r.scores[n].rejectedAt5)}`).join(" | ")} | ${r.eceEndToEnd.ece.toFixed(3)} [${r.eceEndToEnd.low.toFixed(3)}, ${r.eceEndToEnd.high.toFixed(3)}] (${r.eceEndToEnd.n}) |`,
    )
    .join("\n")}`,
);
console.log(
  `\n| dataset | none folder | foreign images | ${SCORES.map((n) => `${n} AUROC`).join(" | ")} |\n|---|---|---|${SCORES.map(() => "---|").join("")}\n${results
    .flatMap((r) =>
      Object.entries(r.bySource).map(
        ([source, a]) => `| ${r.dataset} | ${r.none ? "yes" : "no"} | ${source} | ${SCORES.map((n) => a[n].toFixed(3)).join(" | ")} |`,
      ),
    )
    .join("\n")}`,
);
