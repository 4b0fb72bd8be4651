import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPromotedModel } from "#shared/artifacts.ts";
import type { ArtifactMetadata } from "#shared/contracts/artifact.ts";
import { type EdgeWorker, startEdgeWorker } from "../../../infra/local/edge-worker.ts";
import { type LocalS3, startLocalS3 } from "../../../infra/local/s3-server.ts";
import { type SampleImage, sampleDataset } from "../../../jobs/train/src/dataset/sample.ts";
import { memoryLogger } from "../../../jobs/train/src/log.ts";
import { listCaptures, writeCaptureConfig } from "../../../jobs/train/src/traffic/traffic.ts";
import { train } from "../../../jobs/train/src/train.ts";

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

type Answer = { label: string | null; unsure: boolean; none: boolean; threshold: number | null; predictions: { label: string; score: number }[] };
async function classify(img: SampleImage, query = ""): Promise<Answer> {
  const res = await fetch(`${edge.url}/v1/models/pets/classify${query}`, {
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
      if (a.none) expect(a).toMatchObject({ label: null, unsure: false, threshold: null });
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
