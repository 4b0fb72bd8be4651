import * as tf from "@tensorflow/tfjs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { answer } from "#shared/answer.ts";
import { readPromotedModel } from "#shared/artifacts.ts";
import { DatasetError } from "#shared/errors.ts";
import { keys } from "#shared/keys.ts";
import { CLASS_MEANS_FILE, similarity, similarityFloor, versionClassMeans } from "#shared/novelty.ts";
import { preprocess } from "#shared/preprocess.ts";
import { type LocalS3, startLocalS3 } from "../../infra/local/s3-server.ts";
import { uploadSample } from "../../test/support/datasets.ts";
import { decodeImage } from "./src/dataset/decode.ts";
import { readDataset } from "./src/dataset/read.ts";
import { sampleDataset } from "./src/dataset/sample.ts";
import { fitTemperature } from "./src/fit/calibrate.ts";
import { memoryLogger } from "./src/log.ts";
import { withPooledFeatures } from "./src/model/io.ts";
import { train } from "./src/train.ts";

/**
 * Calibrated scores, per-label thresholds and the none-of-these class, end to end: a real S3 API
 * server, the Twemoji sample, training at 96 px, and the exported model reloaded with the stock loader.
 */
let s3: LocalS3;
beforeAll(async () => {
  s3 = await startLocalS3();
  await uploadSample(s3.store, "emoji", { perLabel: 15 });
});
afterAll(async () => {
  await s3?.stop();
});

// A head stopped after a few epochs: a few held-out mistakes and under-confident scores, so there is a temperature to fit.
const quick = { imageSize: 96, views: 1, head: { epochs: 6, learningRate: 1e-3 } } as const;

/** The stored version's held-out answers as a client computes them: the stock loader, its pooled features, the listed class-means file. */
async function heldOutScores(name: string, version: string): Promise<{ probs: Float32Array[]; truth: number[]; similarities: number[] }> {
  const { metadata, files } = await readPromotedModel(s3.store, name);
  const url = `${s3.endpoint}/${s3.config.bucket}/${keys.versionFile(name, version, "model.json")}`;
  const model = await tf.loadLayersModel(tf.io.http(url, { fetchFunc: fetch }));
  const probe = withPooledFeatures(model);
  const means = versionClassMeans(metadata, files);
  const d = await readDataset(s3.store, name, { seed: 42, valFraction: 0.2 });
  const probs: Float32Array[] = [];
  const truth: number[] = [];
  const similarities: number[] = [];
  for (const img of d.images.filter((i) => i.split === "val")) {
    const input = preprocess(await decodeImage((await s3.store.get(img.key)) as Uint8Array), 96, metadata.preprocessing);
    const [f, p] = tf.tidy(() => (probe.predict(tf.tensor4d(input, [1, 96, 96, 3])) as tf.Tensor[]).map((t) => t.dataSync() as Float32Array));
    probs.push(p as Float32Array);
    if (means) similarities.push(similarity(f as Float32Array, means));
    truth.push(metadata.labels.indexOf(img.label));
  }
  model.dispose();
  return { probs, truth, similarities };
}

describe("answers a client can act on", () => {
  it("exports calibrated scores and stores per-label thresholds, shown in the report", async () => {
    const result = await train(s3.store, { dataset: "emoji", ...quick, promote: "always" }, memoryLogger());
    const { metadata } = await readPromotedModel(s3.store, "emoji");
    const t = metadata.calibration?.temperature as number;
    expect(metadata.calibration).toMatchObject({ method: "temperature", folds: 5 });
    // Not a no-op here, or the next check would prove nothing.
    expect(Math.abs(Math.log(t))).toBeGreaterThan(0.1);
    // T was fitted on these held-out scores: if it is folded into the exported model, fitting again on
    // what the model now says finds nothing left to correct (1); unfolded it would find T again.
    const { probs, truth, similarities } = await heldOutScores("emoji", result.version);
    expect(Math.abs(Math.log(fitTemperature(probs, truth)))).toBeLessThan(0.05);

    // The novelty rule: one direction per label in the listed file; its floor is where 5 % of the labels'
    // held-out images fall, as the stored model and file give their similarities.
    expect(metadata.novelty).toMatchObject({ method: "cosine-class-mean", rows: metadata.labels.length });
    expect(metadata.files.map((f) => f.path)).toContain(CLASS_MEANS_FILE);
    expect(similarities).toHaveLength(truth.length);
    expect(metadata.novelty?.floor).toBeCloseTo(similarityFloor(similarities, 0.05), 3);
    expect(metadata.novelty?.floor).toBeGreaterThan(0); // same-kind images: far more like their labels than orthogonal
    expect(result.report?.novelty).toMatchObject({ floor: metadata.novelty?.floor, reject: 0.05 });

    expect(Object.keys(metadata.thresholds?.byLabel ?? {})).toEqual(metadata.labels);
    expect(metadata.thresholds?.policy).toBe("f1");
    for (const v of Object.values(metadata.thresholds?.byLabel ?? {})) expect(v).toBeGreaterThan(0);
    const html = new TextDecoder().decode((await s3.store.get(keys.versionFile("emoji", result.version, "report.html"))) as Uint8Array);
    expect(html).toContain("reliability diagram before");
    expect(html).toContain("Policy <b>f1</b>");
    expect(html).toContain(`cosine similarity of <b>${metadata.novelty?.floor.toFixed(3)}</b>`);
    expect(result.report?.calibration?.eceBefore).toBeCloseTo(metadata.calibration?.eceBefore as number, 9);
  });

  it("--novelty-reject 0 turns the novelty rule off: no floor, no class-means file, every answer by its scores alone", async () => {
    const result = await train(s3.store, { dataset: "emoji", ...quick, noveltyReject: 0, promote: "always" }, memoryLogger());
    const { metadata } = await readPromotedModel(s3.store, "emoji");
    expect(metadata.version).toBe(result.version);
    expect(metadata.novelty).toBeUndefined();
    expect(metadata.files.map((f) => f.path)).not.toContain(CLASS_MEANS_FILE);
    const p = new Float32Array(metadata.labels.map((_, i) => (i === 0 ? 0.99 : 0.01 / (metadata.labels.length - 1))));
    // A similarity far below any floor changes nothing for a version without one.
    expect(answer({ scores: p, similarity: -1 }, metadata, { topK: 1 })).toMatchObject({ label: metadata.labels[0], none: false });
  });

  it("a precision target sets each label's threshold where the held-out precision reaches it, or says it cannot", async () => {
    const result = await train(s3.store, { dataset: "emoji", ...quick, thresholdPolicy: "precision:0.99", promote: "always" }, memoryLogger());
    const { metadata } = await readPromotedModel(s3.store, "emoji");
    expect(metadata.thresholds?.policy).toBe("precision:0.99");
    const byLabel = result.report?.thresholds?.byLabel ?? {};
    expect(Object.keys(byLabel)).toEqual(metadata.labels);
    for (const [label, v] of Object.entries(byLabel)) {
      expect(metadata.thresholds?.byLabel[label]).toBe(v.threshold);
      if (v.reached) expect(v.precision).toBeGreaterThanOrEqual(0.99);
    }
  });

  it("trains the manifest's none-of-these folder as a class without a threshold", async () => {
    const images = await sampleDataset({ perLabel: 12, size: 96 });
    // Travel emoji play the negatives: images that are neither animals nor food.
    await Promise.all(
      images.map((i) => s3.store.put(`datasets/withnone/${i.label === "travel" ? "_none" : i.label}/${i.name}.${i.file.split(".").pop()}`, i.bytes)),
    );
    await s3.store.put("datasets/withnone/manifest.json", JSON.stringify({ noneLabel: "_none" }));
    const result = await train(s3.store, { dataset: "withnone", ...quick, promote: "always" }, memoryLogger());
    const { metadata } = await readPromotedModel(s3.store, "withnone");
    expect(metadata.labels).toEqual(["_none", "animals", "food"]);
    expect(metadata.noneLabel).toBe("_none");
    expect(Object.keys(metadata.thresholds?.byLabel ?? {})).toEqual(["animals", "food"]);
    expect(result.report?.noneLabel).toBe("_none");
  });

  it("scores the manifest's out-of-distribution folder end to end, never training on it: the share given no label and the AUROC, in the report", async () => {
    const images = await sampleDataset({ perLabel: 8, size: 96 });
    // Travel emoji are out of distribution for an animals/food classifier; one file among them is no image.
    await Promise.all(
      images.map((i) => s3.store.put(`datasets/withood/${i.label === "travel" ? "_ood" : i.label}/${i.name}.${i.file.split(".").pop()}`, i.bytes)),
    );
    await s3.store.put("datasets/withood/_ood/broken.jpg", new TextEncoder().encode("not an image"));
    await s3.store.put("datasets/withood/manifest.json", JSON.stringify({ oodFolder: "_ood" }));
    const result = await train(s3.store, { dataset: "withood", ...quick, promote: "always" }, memoryLogger());
    const { metadata, files } = await readPromotedModel(s3.store, "withood");
    expect(metadata.labels).toEqual(["animals", "food"]);
    const ood = result.report?.ood;
    expect(ood).toMatchObject({ folder: "_ood", images: 8, undecodable: 1, heldOut: result.report?.metrics.evaluatedOn });
    // The share given no label, again from the stored model as the stock loader reads it, with the shipped thresholds.
    const url = `${s3.endpoint}/${s3.config.bucket}/${keys.versionFile("withood", result.version, "model.json")}`;
    const model = await tf.loadLayersModel(tf.io.http(url, { fetchFunc: fetch }));
    // The novelty rule's directions as a worker reads them: the listed file.
    const means = versionClassMeans(metadata, files) as Float32Array;
    const probe = withPooledFeatures(model);
    let rejected = 0;
    for (const img of images.filter((i) => i.label === "travel")) {
      const input = preprocess(await decodeImage(img.bytes), 96, metadata.preprocessing);
      const [f, p] = tf.tidy(() => (probe.predict(tf.tensor4d(input, [1, 96, 96, 3])) as tf.Tensor[]).map((t) => t.dataSync() as Float32Array));
      if (answer({ scores: p as Float32Array, similarity: similarity(f as Float32Array, means) }, metadata, { topK: 1 }).label === null) rejected++;
    }
    model.dispose();
    expect(ood?.rejected).toBeCloseTo(rejected / 8, 9);
    expect(ood?.auroc).toBeGreaterThanOrEqual(0);
    expect(ood?.auroc).toBeLessThanOrEqual(1);
    expect(ood?.similarityAuroc).toBeGreaterThanOrEqual(0);
    expect(ood?.similarityAuroc).toBeLessThanOrEqual(1);
    const html = new TextDecoder().decode((await s3.store.get(keys.versionFile("withood", result.version, "report.html"))) as Uint8Array);
    expect(html).toContain("The <b>_ood</b> folder's 8 images (1 could not be decoded)");
  });

  it("refuses one folder named both none-of-these (trained on) and out-of-distribution (never trained on)", async () => {
    await uploadSample(s3.store, "bothways", { perLabel: 5, manifest: { noneLabel: "travel", oodFolder: "travel" } });
    await expect(readDataset(s3.store, "bothways", { seed: 42 })).rejects.toThrow(/both as the none-of-these folder .* and as the out-of-distribution folder/);
  });

  it("refuses a manifest naming a none-of-these folder the dataset lacks, before computing features", async () => {
    await uploadSample(s3.store, "nonone", { perLabel: 6, manifest: { noneLabel: "_none" } });
    const log = memoryLogger();
    const run = train(s3.store, { dataset: "nonone", ...quick }, log);
    await expect(run).rejects.toThrow(DatasetError);
    await expect(run).rejects.toThrow(/names "_none" as the none-of-these folder/);
    expect(log.lines.some((l) => l.message.includes("features"))).toBe(false);
  });
});
