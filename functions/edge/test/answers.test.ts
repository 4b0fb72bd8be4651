import * as tf from "@tensorflow/tfjs";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Answer } from "#shared/answer.ts";
import { readPromotedModel } from "#shared/artifacts.ts";
import { type ArtifactMetadata, SPLIT_FILES } from "#shared/contracts/artifact.ts";
import { POOL_LAYER, similarity, versionClassMeans } from "#shared/novelty.ts";
import { preprocess } from "#shared/preprocess.ts";
import { type EdgeWorker, startEdgeWorker } from "../../../infra/local/edge-worker.ts";
import { type LocalS3, startLocalS3 } from "../../../infra/local/s3-server.ts";
import { decodeImage } from "../../../jobs/train/src/dataset/decode.ts";
import { type SampleImage, sampleDataset } from "../../../jobs/train/src/dataset/sample.ts";
import { memoryLogger } from "../../../jobs/train/src/log.ts";
import { loadModel } from "../../../jobs/train/src/model/io.ts";
import { listCaptures, writeCaptureConfig } from "../../../jobs/train/src/traffic/traffic.ts";
import { train } from "../../../jobs/train/src/train.ts";
import { publishCopy } from "../../../test/support/versions.ts";

/**
 * The classify API's answer fields in real workerd, against a model really trained with a
 * none-of-these folder: travel emoji are the negatives of an animals/food classifier.
 */
let s3: LocalS3;
let edge: EdgeWorker;
let images: SampleImage[];
let metadata: ArtifactMetadata;

beforeAll(async () => {
  s3 = await startLocalS3();
  images = await sampleDataset({ perLabel: 12, size: 96 });
  const folder = (label: string) => (label === "travel" ? "_none" : label);
  await Promise.all(images.map((i) => s3.store.put(`datasets/pets/${folder(i.label)}/${i.file.split("/").pop()}`, i.bytes)));
  await s3.store.put("datasets/pets/manifest.json", JSON.stringify({ noneLabel: "_none" }));
  await train(s3.store, { dataset: "pets", base: "nsfwjs-mobilenet-v2", imageSize: 96, views: 2, head: { epochs: 20 }, promote: "always" }, memoryLogger());
  metadata = (await readPromotedModel(s3.store, "pets")).metadata;
  // The same version as a whole model only ("pets-whole": its metadata without the split form), so the
  // worker's other path — the whole classifier's pooled features through a view — answers the same images.
  await publishCopy(s3.store, "pets", "pets-whole", { edit: ({ split: _split, ...m }) => m, drop: Object.values(SPLIT_FILES) });
  // And as a second split head on the same base ("pets-twin"): a request to both shares one pass of the base.
  await publishCopy(s3.store, "pets", "pets-twin");
  edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 1 });
});
afterAll(async () => {
  await edge?.stop();
  await s3?.stop();
});

/** Blends of an animal and a food emoji, from all animal to all food: answers from sure to unsure and back. */
async function blends(): Promise<SampleImage[]> {
  const raw = async (i: SampleImage) => sharp(i.bytes).resize(96, 96).removeAlpha().raw().toBuffer();
  const animals = images.filter((i) => i.label === "animals").slice(0, 3);
  const foods = images.filter((i) => i.label === "food").slice(0, 3);
  const out: SampleImage[] = [];
  for (const [k, a] of animals.entries()) {
    const [pa, pf] = [await raw(a), await raw(foods[k] as SampleImage)];
    for (let step = 1; step < 10; step++) {
      const mixed = Buffer.from(pa.map((v, i) => Math.round(v * (1 - step / 10) + (pf[i] as number) * (step / 10))));
      const bytes = new Uint8Array(
        await sharp(mixed, { raw: { width: 96, height: 96, channels: 3 } })
          .png()
          .toBuffer(),
      );
      out.push({ ...a, file: `blend-${k}-${step}.png`, bytes });
    }
  }
  return out;
}

async function classify(img: SampleImage, query = "", model = "pets"): Promise<Answer> {
  const res = await fetch(`${edge.url}/v1/models/${model}/classify${query}`, {
    method: "POST",
    headers: { authorization: `Bearer ${edge.apiKey}`, "content-type": img.file.endsWith(".jpg") ? "image/jpeg" : "image/png" },
    body: img.bytes as BodyInit,
  });
  expect(res.status).toBe(200);
  return (await res.json()) as Answer;
}

describe("classify answers", () => {
  it("says none of these, with no label, for the rejection class, and never lists it as a label", async () => {
    const answers = await Promise.all(images.filter((i) => i.label === "travel").map((i) => classify(i, "?top_k=5")));
    // Training images of the none folder: the model has learnt them.
    expect(answers.filter((a) => a.none).length).toBeGreaterThan(answers.length / 2);
    for (const a of answers) {
      expect(a.predictions.map((p) => p.label).sort()).toEqual(["animals", "food"]);
      if (a.none) expect(a).toMatchObject({ label: null, unsure: false, threshold: null, noneBy: expect.stringMatching(/^(class|novelty)$/) });
      else expect(a.noneBy).toBeUndefined();
    }
  });

  it("holds each answer to its label's threshold from the version's metadata", async () => {
    const thresholds = metadata.thresholds?.byLabel ?? {};
    expect(Object.keys(thresholds).sort()).toEqual(["animals", "food"]);
    for (const img of images.filter((i) => i.label !== "travel")) {
      const a = await classify(img);
      if (a.none) continue;
      const top = a.predictions[0] as { label: string; score: number };
      expect(a.threshold).toBe(thresholds[top.label]);
      expect(a.unsure).toBe(top.score < (thresholds[top.label] as number));
      expect(a.label).toBe(a.unsure ? null : top.label);
    }
  });

  it("?threshold= overrides every label's threshold", async () => {
    // An image answered with a label, with a top score a threshold can sit above.
    let img: SampleImage | undefined;
    let plain: Answer | undefined;
    for (const candidate of images.filter((i) => i.label !== "travel")) {
      plain = await classify(candidate);
      if (!plain.none && (plain.predictions[0]?.score ?? 1) < 0.99) {
        img = candidate;
        break;
      }
    }
    if (!img || !plain) throw new Error("no image answered with a label below 0.99");
    const top = plain.predictions[0] as { label: string; score: number };
    const above = await classify(img, `?threshold=${(top.score + 0.001).toFixed(4)}`);
    expect(above).toMatchObject({ unsure: true, label: null });
    const below = await classify(img, "?threshold=0");
    expect(below).toMatchObject({ unsure: false, label: top.label, threshold: 0 });
  });

  it("422 for a threshold that is not a number from 0 to 1; the model route shows the rules", async () => {
    const img = images[0] as SampleImage;
    for (const q of ["?threshold=abc", "?threshold=1.5", "?threshold=-0.1"]) {
      const res = await fetch(`${edge.url}/v1/models/pets/classify${q}`, {
        method: "POST",
        headers: { authorization: `Bearer ${edge.apiKey}`, "content-type": "image/png" },
        body: img.bytes as BodyInit,
      });
      expect(res.status).toBe(422);
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe("invalid_threshold");
    }
    const model = (await (await fetch(`${edge.url}/v1/models/pets`, { headers: { authorization: `Bearer ${edge.apiKey}` } })).json()) as Record<
      string,
      unknown
    >;
    expect(model).toMatchObject({ noneLabel: "_none", thresholds: { policy: "f1" }, calibration: { method: "temperature" } });
  });

  it("the novelty rule: split head and whole model give the similarity the training side computes; below its floor, none of these", async () => {
    const n = metadata.novelty;
    if (!n) throw new Error("the version has no novelty floor");
    // The training side's computation: the stock loader's whole model, its pooled features, the listed directions.
    const { files } = await readPromotedModel(s3.store, "pets");
    const model = await loadModel(files.get("model.json") as Uint8Array, files);
    const probe = tf.model({ inputs: model.inputs, outputs: model.getLayer(POOL_LAYER).output as tf.SymbolicTensor });
    const means = versionClassMeans(metadata, files) as Float32Array;
    // Images of the labels, negatives, and two that are nothing the model knows: flat grey and noise.
    const grey = new Uint8Array(
      await sharp({ create: { width: 96, height: 96, channels: 3, background: "#808080" } })
        .png()
        .toBuffer(),
    );
    const noise = new Uint8Array(
      await sharp(Buffer.from(Array.from({ length: 96 * 96 * 3 }, (_, i) => (i * 7919) % 251)), { raw: { width: 96, height: 96, channels: 3 } })
        .png()
        .toBuffer(),
    );
    const probes: SampleImage[] = [
      ...images.filter((i) => i.label !== "travel").slice(0, 4),
      ...images.filter((i) => i.label === "travel").slice(0, 2),
      { ...(images[0] as SampleImage), file: "grey.png", bytes: grey },
      { ...(images[0] as SampleImage), file: "noise.png", bytes: noise },
    ];
    const similarities: number[] = [];
    for (const img of probes) {
      const [split, whole] = [await classify(img), await classify(img, "", "pets-whole")];
      const input = preprocess(await decodeImage(img.bytes), 96, metadata.preprocessing);
      const features = tf.tidy(() => (probe.predict(tf.tensor4d(input, [1, 96, 96, 3])) as tf.Tensor).dataSync() as Float32Array);
      expect(split.similarity).toBeCloseTo(similarity(features, means), 3);
      expect(whole.similarity).toBeCloseTo(split.similarity as number, 3);
      expect(split.similarityFloor).toBeCloseTo(n.floor, 4);
      // Below the floor: none of these, by the floor unless the none class won anyway (it is checked first).
      if ((split.similarity as number) < n.floor)
        expect(split).toMatchObject({ none: true, noneBy: expect.stringMatching(/^(class|novelty)$/), label: null, unsure: false, threshold: null });
      if (split.label !== null) expect(split.similarity).toBeGreaterThanOrEqual(n.floor);
      similarities.push(split.similarity as number);
    }
    model.dispose();
    // The rule is shown at work, not only consistent: grey and noise fall below the floor, the labels' own images above it.
    expect(similarities.slice(0, 4).every((v) => v >= n.floor)).toBe(true);
    expect(similarities.slice(-2).every((v) => v < n.floor)).toBe(true);
  });

  it("one request to two heads of one base and a whole model: each answers with its similarity, and no tensor is left behind", async () => {
    const img = images.find((i) => i.label === "food") as SampleImage;
    const single = await classify(img);
    const multi = async () => {
      const res = await fetch(`${edge.url}/v1/classify?models=pets,pets-twin,pets-whole`, {
        method: "POST",
        headers: { authorization: `Bearer ${edge.apiKey}`, "content-type": "image/png" },
        body: img.bytes as BodyInit,
      });
      expect(res.status).toBe(200);
      return ((await res.json()) as { results: (Answer & { model: string })[] }).results;
    };
    const tensors = async () =>
      ((await (await fetch(`${edge.url}/healthz`, { headers: { authorization: `Bearer ${edge.apiKey}` } })).json()) as { memory: { tensors: number } }).memory
        .tensors;
    const results = await multi(); // loads pets-twin (new tensors): counted from here
    expect(results.map((r) => r.model)).toEqual(["pets", "pets-twin", "pets-whole"]);
    for (const r of results) {
      expect(r.similarity).toBeCloseTo(single.similarity as number, 3);
      expect(r.label).toBe(single.label);
    }
    const before = await tensors();
    for (let i = 0; i < 3; i++) await multi();
    expect(await tensors()).toBe(before);
  });

  it("a version whose directions do not fit its features is not served: 503 model_unavailable, the reason in /healthz", async () => {
    const n = metadata.novelty as NonNullable<ArtifactMetadata["novelty"]>;
    // A writer's fault: the metadata says one feature more than the head takes (the file then has the wrong size too).
    await publishCopy(s3.store, "pets", "pets-bad", { edit: (m) => ({ ...m, novelty: { ...n, features: n.features + 1 } }) });
    const res = await fetch(`${edge.url}/v1/models/pets-bad/classify`, {
      method: "POST",
      headers: { authorization: `Bearer ${edge.apiKey}`, "content-type": "image/png" },
      body: (images[0] as SampleImage).bytes as BodyInit,
    });
    expect(res.status).toBe(503);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("model_unavailable");
    const health = (await (await fetch(`${edge.url}/healthz`, { headers: { authorization: `Bearer ${edge.apiKey}` } })).json()) as {
      models: { name: string; problem: string | null }[];
    };
    expect(health.models.find((m) => m.name === "pets-bad")?.problem).toMatch(/novelty rule cannot be used/);
    // The other models are untouched.
    expect((await classify(images[0] as SampleImage)).predictions.length).toBeGreaterThan(0);
  });

  it("capture with no number set stores what the version answers unsure (not what ?threshold= says); a set number keeps its meaning", async () => {
    const thresholds = metadata.thresholds?.byLabel ?? {};
    const traffic = await blends();
    const pause = () => new Promise((r) => setTimeout(r, 150)); // one capture's encoding at a time: none dropped as busy
    // The worker re-reads capture settings after its TTL (1 s), after an answer: one answer (opted out) starts it.
    const settle = async () => {
      await new Promise((r) => setTimeout(r, 1100));
      await fetch(`${edge.url}/v1/models/pets/classify`, {
        method: "POST",
        headers: { authorization: `Bearer ${edge.apiKey}`, "content-type": "image/png", "x-edgetune-capture": "off" },
        body: (traffic[0] as SampleImage).bytes as BodyInit,
      });
      await pause();
    };
    const captured = async (n: number) => {
      for (let i = 0; i < 100 && (await listCaptures(s3.store, "pets")).length < n; i++) await new Promise((r) => setTimeout(r, 100));
      return listCaptures(s3.store, "pets");
    };
    const topScores = (cs: { predictions: { score: number }[] }[]) => cs.map((c) => Number(c.predictions[0]?.score).toFixed(4)).sort();

    await writeCaptureConfig(s3.store, "pets", { enabled: true, sampleRate: 0 });
    await settle();
    // ?threshold=0 makes every answer a label for the caller: capture must still follow the version's own thresholds.
    const answers: Answer[] = [];
    for (const img of traffic) {
      answers.push(await classify(img, "?threshold=0&top_k=5"));
      await pause();
    }
    const sure = answers.filter((a) => !a.none);
    const unsure = sure.filter((a) => (a.predictions[0]?.score as number) < (thresholds[a.predictions[0]?.label as string] as number));
    expect(answers.every((a) => !a.unsure)).toBe(true);
    // The blends must hold both kinds, or this test shows nothing.
    expect(unsure.length).toBeGreaterThan(0);
    expect(unsure.length).toBeLessThan(answers.length);
    const first = await captured(unsure.length);
    expect(topScores(first)).toEqual(topScores(unsure));
    for (const c of first) expect(c.reason).toBe("low_confidence");

    // An explicit number (as capture.json files written before thresholds hold): the top score against it.
    const scores = sure.map((a) => a.predictions[0]?.score as number).sort((a, b) => a - b);
    const below = Number(((scores[Math.floor(scores.length / 2)] as number) + 1e-4).toFixed(4)); // about half of them
    await writeCaptureConfig(s3.store, "pets", { belowConfidence: below });
    await settle();
    for (const img of traffic.filter((_, i) => !answers[i]?.none)) {
      await classify(img);
      await pause();
    }
    const expected = sure.filter((a) => (a.predictions[0]?.score as number) < below);
    const second = (await captured(first.length + expected.length)).filter((c) => !first.some((f) => f.id === c.id));
    expect(topScores(second)).toEqual(topScores(expected));
  });
});
