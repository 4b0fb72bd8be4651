import * as tf from "@tensorflow/tfjs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPointer, readPromotedModel } from "#shared/artifacts.ts";
import { servedFiles } from "#shared/contracts/artifact.ts";
import { DatasetError } from "#shared/errors.ts";
import { keys } from "#shared/keys.ts";
import { preprocess } from "#shared/preprocess.ts";
import { type LocalS3, startLocalS3 } from "../../infra/local/s3-server.ts";
import { uploadSample } from "../../test/support/datasets.ts";
import { killWhen, spawnTrainJob } from "../../test/support/jobs.ts";
import { decodeImage } from "./src/dataset/decode.ts";
import { sampleDataset } from "./src/dataset/sample.ts";
import { memoryLogger } from "./src/log.ts";
import { KNOWN_BASES } from "./src/model/bases.ts";
import { loadModel } from "./src/model/io.ts";
import { argmax } from "./src/release/evaluate.ts";
import { train } from "./src/train.ts";

/**
 * The training job end to end on a real S3 API server, real images (the Twemoji sample), the real
 * suite's base (darknet-tiny from ../shared/models, else the nsfwjs MobileNetV2: 40 head epochs, early
 * stopped, so the weaker of the two also clears the bar), at 96 px so it runs in seconds on 2 cores.
 */
let s3: LocalS3;
beforeAll(async () => {
  s3 = await startLocalS3();
  await uploadSample(s3.store, "emoji", { perLabel: 15 });
});
afterAll(async () => {
  await s3?.stop();
});

const quick = { imageSize: 96, views: 2, head: { epochs: 40 } } as const;

describe("train (head strategy)", () => {
  it("trains, promotes, and the export reloads with stock tf.loadLayersModel and reproduces its accuracy", async () => {
    const log = memoryLogger();
    const result = await train(s3.store, { dataset: "emoji", ...quick }, log);
    expect(result).toMatchObject({ status: "trained", name: "emoji", promoted: true });
    expect(result.accuracy).toBeGreaterThan(0.6); // 3 classes: chance is 0.33

    const pointer = await readPointer(s3.store, "emoji");
    expect(pointer?.version).toBe(result.version);
    const { metadata } = await readPromotedModel(s3.store, "emoji");
    // The pointer says what the edge fetches beside the metadata: the head, on the base the metadata names.
    expect(pointer?.served).toEqual(servedFiles(metadata));
    expect(pointer?.served).toMatchObject({ form: "split", base: { sha256: metadata.base.sha256, size: 96 } });
    expect(metadata.labels).toEqual(["animals", "food", "travel"]);
    expect(metadata.weights.dtype).toBe("float16");
    expect(metadata.files.map((f) => f.path).sort()).toEqual([
      "class-means.bin",
      "group1-shard1of1.bin",
      "head-shard1of1.bin",
      "head.json",
      "model.json",
      "report.html",
      "report.json",
    ]);

    // Stock loader over plain HTTP from the S3 server, then score the held-out images ourselves.
    const url = `${s3.endpoint}/${s3.config.bucket}/${keys.versionFile("emoji", result.version, "model.json")}`;
    const model = await tf.loadLayersModel(tf.io.http(url, { fetchFunc: fetch }));
    const val = (result.report?.dataset.counts ?? {}) as Record<string, { val: number }>;
    const valCount = Object.values(val).reduce((n, c) => n + c.val, 0);
    expect(valCount).toBe(metadata.metrics.evaluatedOn);
    const heldOut = await heldOutKeys(result.report?.dataset.fingerprint ? "emoji" : "");
    let correct = 0;
    for (const { key, label } of heldOut) {
      const input = preprocess(await decodeImage((await s3.store.get(key)) as Uint8Array), 96, metadata.preprocessing);
      const p = tf.tidy(() => (model.predict(tf.tensor4d(input, [1, 96, 96, 3])) as tf.Tensor).dataSync());
      if (metadata.labels[argmax(p)] === label) correct++;
    }
    expect(heldOut.length).toBe(metadata.metrics.evaluatedOn);
    expect(Math.abs(correct / heldOut.length - metadata.metrics.accuracy)).toBeLessThanOrEqual(1 / heldOut.length + 1e-9);
    model.dispose();

    const report = JSON.parse(new TextDecoder().decode((await s3.store.get(keys.versionFile("emoji", result.version, "report.json"))) as Uint8Array));
    expect(report.confusion).toHaveLength(3);
    const html = new TextDecoder().decode((await s3.store.get(keys.versionFile("emoji", result.version, "report.html"))) as Uint8Array);
    expect(html).toContain("<svg");
    expect(log.lines.some((l) => l.message.startsWith("backend wasm"))).toBe(true);
  });

  it("does nothing when the same dataset and config are triggered again", async () => {
    const again = await train(s3.store, { dataset: "emoji", ...quick }, memoryLogger());
    expect(again.status).toBe("exists");
  });

  // On the nsfwjs base (no ../shared) a barely trained head ties the served one on the 9 held-out images.
  it.skipIf(!process.env.EDGETUNE_BASES_DIR)("keeps the current model when the new one is worse (needs ../shared/models)", async () => {
    // A barely trained head at another input size (so it cannot warm-start from the served one, and
    // the served model is scored end to end on the same held-out images).
    const bad = await train(
      s3.store,
      { dataset: "emoji", ...quick, imageSize: 128, head: { epochs: 1, learningRate: 1e-7 }, views: 1, seed: 42 },
      memoryLogger(),
    );
    expect(bad.status).toBe("trained");
    expect(bad.promoted, `${bad.accuracy} ${bad.reason}`).toBe(false);
    expect(bad.reason).toMatch(/worse than current/);
    const pointer = await readPointer(s3.store, "emoji");
    expect(pointer?.version).not.toBe(bad.version);
  });

  it("computes features only for new images when retraining", async () => {
    await uploadSample(s3.store, "emoji", { perLabel: 3, offset: 1 });
    const log = memoryLogger();
    await train(s3.store, { dataset: "emoji", ...quick }, log);
    const features = log.lines.find((l) => l.message === "features done")?.fields as { cached: number; computed: number };
    expect(features.computed).toBeGreaterThan(0);
    expect(features.computed).toBeLessThanOrEqual(9);
    expect(features.cached).toBeGreaterThanOrEqual(45);
  });
});

describe("train (fine-tune strategy)", () => {
  it("retrains the top blocks from the head and exports a reloadable model", async () => {
    await uploadSample(s3.store, "emoji-ft", { perLabel: 10 });
    // 10 images per label at 96 px make a weak model; this test is about the mechanics, so it is served regardless.
    const result = await train(s3.store, { dataset: "emoji-ft", ...quick, strategy: "finetune", fineTune: { epochs: 2 }, promote: "always" }, memoryLogger());
    expect(result.status).toBe("trained");
    expect(result.report?.history.fineTune).toHaveLength(2);
    const { metadata, files } = await readPromotedModel(s3.store, "emoji-ft");
    expect(metadata.strategy).toBe("finetune");
    // Its base changed: served whole, no head on a shared base (ARCHITECTURE.md "One base, many models").
    expect(metadata.split).toBeUndefined();
    expect(files.has("head.json")).toBe(false);
    const served = (await readPointer(s3.store, "emoji-ft"))?.served;
    expect(served?.form).toBe("whole");
    expect(served?.files.map((f) => f.path).sort()).toEqual(["class-means.bin", "group1-shard1of1.bin", "model.json"]);
    // The labels' directions come from the tuned top's features: as wide as the whole model's pooling.
    expect(metadata.novelty?.features).toBe((await loadModel(files.get("model.json") as Uint8Array, files)).getLayer("edgetune_pool").outputShape.at(-1));
    // The cut of the base the suite runs on (darknet-tiny from ../shared/models, else nsfwjs).
    expect(metadata.hyperparameters.fineTuneFrom).toBe(KNOWN_BASES.find((b) => b.id === metadata.base.id)?.fineTuneFrom);
    expect(files.get("model.json")?.byteLength).toBeGreaterThan(1000);
  });
});

describe("bad datasets", () => {
  it("skips corrupt, empty and non-image files, reports them and still trains", async () => {
    const images = await uploadSample(s3.store, "messy", { perLabel: 8 });
    const good = images[0]?.bytes as Uint8Array;
    await s3.store.put("datasets/messy/animals/truncated.jpg", good.slice(0, 200));
    await s3.store.put("datasets/messy/food/not-really.png", "hello, I am text");
    await s3.store.put("datasets/messy/food/empty.jpg", new Uint8Array());
    await s3.store.put("datasets/messy/travel/notes.txt", "ignore me");
    const result = await train(s3.store, { dataset: "messy", ...quick }, memoryLogger());
    expect(result.status).toBe("trained");
    const skipped = result.report?.skipped.map((s) => s.key.split("/").pop()) ?? [];
    expect(skipped.sort()).toEqual(["not-really.png", "truncated.jpg"]);
    const ignored = result.report?.ignored.map((s) => s.key.split("/").pop()) ?? [];
    expect(ignored.sort()).toEqual(["empty.jpg", "notes.txt"]);
  });

  it("reports only its own skipped files, not those of another dataset that shares the feature cache", async () => {
    // "messy" above left its undecodable files in the cache of this base and spec.
    await uploadSample(s3.store, "tidy", { perLabel: 8 });
    const result = await train(s3.store, { dataset: "tidy", ...quick, promote: "always" }, memoryLogger());
    expect(result.report?.skipped).toEqual([]);
    const { metadata } = await readPromotedModel(s3.store, "tidy");
    expect(metadata.dataset.skipped).toBe(0);
  });

  it("refuses invalid label folders before any image is fetched, naming the folder", async () => {
    const images = await uploadSample(s3.store, "long-label", { perLabel: 6 });
    const long = "x".repeat(300);
    for (const [i, img] of images.filter((im) => im.label === "food").entries()) await s3.store.put(`datasets/long-label/${long}/${i}.png`, img.bytes);
    const log = memoryLogger();
    const err = await train(s3.store, { dataset: "long-label", ...quick }, log).catch((e) => e);
    expect(err).toBeInstanceOf(DatasetError);
    expect(err.message).toMatch(/label folder "x{40}…" \(300 characters\) is not a valid label/);
    expect(log.lines.some((l) => l.message === "features done")).toBe(false);
  });

  it("fails fast with a message that says what to fix", async () => {
    await uploadSample(s3.store, "one-label", { perLabel: 6, labels: ["food"] });
    await expect(train(s3.store, { dataset: "one-label", ...quick }, memoryLogger())).rejects.toThrow(/at least 2 label folders/);
    await uploadSample(s3.store, "too-few", { perLabel: 6, labels: ["food"] });
    await s3.store.put("datasets/too-few/travel/a.png", (await uploadSample(s3.store, "scratch", { perLabel: 1 }))[0]?.bytes as Uint8Array);
    const err = await train(s3.store, { dataset: "too-few", ...quick }, memoryLogger()).catch((e) => e);
    expect(err).toBeInstanceOf(DatasetError);
    expect(err.message).toMatch(/"travel" has 1 image\(s\); every label needs at least 5/);
    await expect(train(s3.store, { dataset: "no-such-dataset", ...quick }, memoryLogger())).rejects.toThrow(/has no manifest.json/);
  });
});

describe("near-identical images across the split", () => {
  it("leaves a held-out copy of a training image out of the evaluation and names the pair in the report", async () => {
    const images = await sampleDataset({ perLabel: 8, size: 128 });
    // Given splits: 6 per label to train, 2 held out, plus a re-encoded, shifted copy of a training image held out.
    const byLabel = (l: string) => images.filter((i) => i.label === l);
    for (const label of ["animals", "food", "travel"])
      for (const [n, img] of byLabel(label).entries()) await s3.store.put(`datasets/dups/${n < 6 ? "train" : "val"}/${img.file}`, img.bytes);
    const original = byLabel("food")[0] as (typeof images)[number];
    const sharp = (await import("sharp")).default;
    const copy = await sharp(original.bytes).resize(256, 256).jpeg({ quality: 90 }).toBuffer(); // a larger re-encoded copy
    await s3.store.put("datasets/dups/val/food/copy-of-first.jpg", new Uint8Array(copy));
    await s3.store.put("datasets/dups/manifest.json", "{}");
    const r = await train(s3.store, { dataset: "dups", imageSize: 128, views: 1, head: { epochs: 5 }, promote: "always" }, memoryLogger());
    const report = JSON.parse(new TextDecoder().decode((await s3.store.get(`models/dups/${r.version}/report.json`)) as Uint8Array));
    expect(report.nearDuplicates).toEqual([
      { heldOut: "datasets/dups/val/food/copy-of-first.jpg", training: `datasets/dups/train/${original.file}`, bits: expect.any(Number) },
    ]);
    // 3 labels × 2 held out: the copy is not among the evaluated images.
    expect(report.metrics.evaluatedOn).toBe(6);
  });
});

describe("promotion needs evidence", () => {
  /** A split dataset: train/<label>/… from the sample, and val/<label>/… built by `val`. */
  async function splitDataset(name: string, val: (label: string, images: { label: string; bytes: Uint8Array }[]) => Uint8Array[]) {
    const images = await sampleDataset({ perLabel: 12, size: 96 });
    const labels = [...new Set(images.map((i) => i.label))];
    for (const label of labels) {
      const mine = images.filter((i) => i.label === label);
      for (const [i, img] of mine.slice(0, 8).entries()) await s3.store.put(`datasets/${name}/train/${label}/${i}.png`, img.bytes);
      for (const [i, bytes] of val(label, images).entries()) await s3.store.put(`datasets/${name}/val/${label}/${i}.png`, bytes);
    }
    // A model of its own per dataset: a model belongs to the dataset that created it.
    await s3.store.put(`datasets/${name}/manifest.json`, JSON.stringify({ model: `evidence-${name}` }));
    return labels;
  }

  it("keeps a version back when its held-out images could not be evaluated, even as a first version", async () => {
    await splitDataset("no-evidence", () => [new TextEncoder().encode("not an image"), new TextEncoder().encode("nor this")]);
    const result = await train(s3.store, { dataset: "no-evidence", ...quick }, memoryLogger());
    expect(result).toMatchObject({ status: "trained", promoted: false });
    expect(result.reason).toMatch(/not enough held-out evidence: "animals" 0, "food" 0, "travel" 0 held-out image\(s\)/);
    expect(result.report?.promotion.reason).toBe(result.reason);
    expect(await readPointer(s3.store, "evidence-no-evidence")).toBeNull();
  });

  it("keeps back a first version that is no better than always answering the most common label", async () => {
    // Held-out labels rotated: every val/animals image is food, and so on. The model is fine; its
    // held-out accuracy is not, and a first version at that accuracy must not be served.
    await splitDataset("swapped", (label, images) => {
      const labels = ["animals", "food", "travel"];
      const other = labels[(labels.indexOf(label) + 1) % 3];
      return images
        .filter((i) => i.label === other)
        .slice(8, 12)
        .map((i) => i.bytes);
    });
    // A base on which 8 training images per label at 96 px learn the labels well (tuned on it).
    const result = await train(s3.store, { dataset: "swapped", ...quick, base: "nsfwjs-mobilenet-v2" }, memoryLogger());
    expect(result).toMatchObject({ status: "trained", promoted: false });
    expect(result.reason).toMatch(/no better than always answering "\w+": [\d.]+ % vs 33\.3 % on 12 held-out images/);
    expect(await readPointer(s3.store, "evidence-swapped")).toBeNull();
  });
});

describe("interrupted runs", () => {
  it("resumes a killed job from its cached feature packs", async () => {
    // A bucket of its own: nothing cached there, so the packs can only come from the killed run.
    const own = await startLocalS3({ bucket: "resume" });
    try {
      await uploadSample(own.store, "killed", { perLabel: 12 });
      const child = spawnTrainJob(own, ["--dataset", "killed", "--image-size", "96", "--views", "1", "--epochs", "5"], { EDGETUNE_PACK_IMAGES: "4" });
      // Kill it (like a spot reclaim) as soon as the first packs are in the bucket.
      await killWhen(own, child, "cache/embeddings/", (keys) => keys.filter((k) => k.endsWith(".bin")).length >= 2);
      expect(await readPointer(own.store, "killed")).toBeNull();
      const log = memoryLogger();
      const result = await train(own.store, { dataset: "killed", imageSize: 96, views: 1, head: { epochs: 5 }, promote: "always" }, log);
      expect(result.promoted).toBe(true);
      const features = log.lines.find((l) => l.message === "features done")?.fields as { cached: number; computed: number };
      expect(features.cached).toBeGreaterThanOrEqual(8);
    } finally {
      await own.stop();
    }
  });
});

async function heldOutKeys(name: string): Promise<{ key: string; label: string }[]> {
  const { readDataset } = await import("./src/dataset/read.ts");
  const d = await readDataset(s3.store, name, { seed: 42, valFraction: 0.2 });
  return d.images.filter((i) => i.split === "val").map((i) => ({ key: i.key, label: i.label }));
}

describe("sharded feature extraction (AWS Batch array jobs)", () => {
  it("children embed disjoint shards that cover the dataset; training then computes nothing", async () => {
    const { embedShard } = await import("./src/features/shard.ts");
    // A bucket of its own: the other tests' runs have cached the features of these images already.
    const own = await startLocalS3({ bucket: "sharded" });
    const s3 = own;
    await uploadSample(s3.store, "sharded", { perLabel: 8 });
    const opts = { dataset: "sharded", imageSize: 96 as const, views: 2 };
    const a = await embedShard(s3.store, opts, 0, 3, memoryLogger());
    const b = await embedShard(s3.store, opts, 1, 3, memoryLogger());
    const c = await embedShard(s3.store, opts, 2, 3, memoryLogger());
    expect(a.images + b.images + c.images).toBe(24);
    expect(a.computed + b.computed + c.computed).toBe(24);
    expect((await embedShard(s3.store, opts, 1, 3, memoryLogger())).computed).toBe(0);
    const log = memoryLogger();
    await train(s3.store, { ...opts, head: { epochs: 5 } }, log);
    const features = log.lines.find((l) => l.message === "features done")?.fields as { cached: number; computed: number };
    expect(features).toMatchObject({ computed: 0, cached: 24 });
    await expect(embedShard(s3.store, opts, 3, 3, memoryLogger())).rejects.toThrow(/shard must be 0…2 of 3/);
    await own.stop();
  });

  it("a run with more images to embed than one machine should fans out to array children, then computes nothing", async () => {
    const { localFanOut } = await import("../../infra/local/fan-out.ts");
    const own = await startLocalS3({ bucket: "fanned" });
    await uploadSample(own.store, "fanned", { perLabel: 8 });
    // The children are the real CLI in processes of their own, as Batch would run them.
    const fanOut = localFanOut(own.config, { imagesPerShard: 6, maxShards: 3 });
    const log = memoryLogger();
    const result = await train(own.store, { dataset: "fanned", imageSize: 96, views: 2, head: { epochs: 5 } }, log, { fanOut });
    expect(result.status).toBe("trained");
    expect(fanOut.exits).toEqual([0, 0, 0]); // 19 training images / 6 per child, capped at 3 children
    const features = log.lines.find((l) => l.message === "features done")?.fields as { cached: number; computed: number };
    expect(features).toMatchObject({ computed: 0, cached: 24 });
    await own.stop();
  });
});
