import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPromotedModel } from "#shared/artifacts.ts";
import type { ArtifactMetadata } from "#shared/contracts/artifact.ts";
import { type EdgeWorker, startEdgeWorker } from "../../../infra/local/edge-worker.ts";
import { type LocalS3, startLocalS3 } from "../../../infra/local/s3-server.ts";
import { type SampleImage, sampleDataset } from "../../../jobs/train/src/dataset/sample.ts";
import { memoryLogger } from "../../../jobs/train/src/log.ts";
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
});
