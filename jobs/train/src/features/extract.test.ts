import * as tf from "@tensorflow/tfjs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ObjectStore } from "#shared/s3/store.ts";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import type { DatasetImage } from "../dataset/read.ts";
import { sampleDataset } from "../dataset/sample.ts";
import { initBackend } from "../model/backend.ts";
import type { ExtractorSpec } from "./extract.ts";
import { createForwardPool } from "./forward-pool.ts";

// Small packs, so that a handful of images spans several packs and batches (read at import).
process.env.EDGETUNE_PACK_IMAGES = "5";
const { extractFeatures } = await import("./extract.ts");

let s3: LocalS3;
let extractor: tf.LayersModel;
const images: DatasetImage[] = [];
beforeAll(async () => {
  await initBackend();
  s3 = await startLocalS3();
  // A real (small) convolutional extractor with fixed weights: what matters here is the pipeline.
  const input = tf.input({ shape: [32, 32, 3] });
  const conv = tf.layers.conv2d({ filters: 8, kernelSize: 3, strides: 2, kernelInitializer: tf.initializers.glorotUniform({ seed: 1 }) }).apply(input);
  extractor = tf.model({ inputs: input, outputs: conv as tf.SymbolicTensor });
  for (const [i, s] of (await sampleDataset({ perLabel: 4, size: 64 })).entries()) {
    const key = `datasets/emb/${s.file}`;
    await s3.store.put(key, s.bytes);
    images.push({ key, id: `img-${i}`, label: s.label, split: "train" });
  }
  await s3.store.put("datasets/emb/broken.jpg", new Uint8Array([0xff, 0xd8, 0xff, 0x00, 1, 2, 3]));
  images.push({ key: "datasets/emb/broken.jpg", id: "broken", label: "animals", split: "train" });
});
afterAll(async () => {
  extractor?.dispose();
  await s3?.stop();
});

const spec = (seed: number): ExtractorSpec => ({
  baseSha256: "test",
  layer: "conv",
  pooled: true,
  size: 32,
  preprocessing: { version: 1, fit: "center-crop", normalization: "0-1" },
  views: 2,
  seed,
});

describe("extractFeatures", () => {
  it("streams every image through packs once, and a second run reads the same numbers back", async () => {
    const progress: number[] = [];
    const first = await extractFeatures(s3.store, extractor, spec(1), images, (done) => progress.push(done), { threads: 1 });
    expect(first.stats).toMatchObject({ cached: 0, computed: images.length - 1, failed: 1, packsWritten: Math.ceil(images.length / 5) });
    expect(first.failed.get("broken")?.reason).toMatch(/corrupt|readable/);
    expect(progress.at(-1)).toBe(images.length);
    expect(first.shape).toEqual([8]);
    for (const image of images.slice(0, -1)) expect(first.byId.get(image.id)).toHaveLength(2);

    const again = await extractFeatures(s3.store, extractor, spec(1), images, () => {}, { threads: 1 });
    expect(again.stats).toMatchObject({ cached: images.length, computed: 0, packsWritten: 0 });
    for (const image of images.slice(0, -1)) expect(again.byId.get(image.id)).toEqual(first.byId.get(image.id));
  });

  it("the per-core pool computes the same features as this thread", async () => {
    const local = await extractFeatures(s3.store, extractor, spec(2), images, () => {}, { threads: 1 });
    const pooled = await extractFeatures(s3.store, extractor, spec(3), images, () => {}, { threads: 2 });
    // Different seeds give different augmented views; view 0 (the image as served) is the same.
    for (const image of images.slice(0, -1)) expect(pooled.byId.get(image.id)?.[0]).toEqual(local.byId.get(image.id)?.[0]);
  });

  it("fails with the reason when a forward-pass worker dies, and writes no pack it could not finish", async () => {
    const workerScript = new URL("../../../../test/support/crashing-forward-worker.ts", import.meta.url);
    const pool = await createForwardPool(extractor, { size: 32, pooled: true, threads: 2, workerScript });
    try {
      await expect(extractFeatures(s3.store, extractor, spec(5), images, () => {}, { pool })).rejects.toThrow(/worker stopped \(exit code 7\)/);
    } finally {
      await pool.close();
    }
    const after = await extractFeatures(s3.store, extractor, spec(5), images, () => {}, { threads: 1 });
    expect(after.stats.packsRead).toBe(0);
  });

  it("fails when a pack cannot be written, after the packs that could be", async () => {
    let puts = 0;
    const real = s3.store;
    const flaky: ObjectStore = {
      get: (k) => real.get(k),
      head: (k) => real.head(k),
      list: (p) => real.list(p),
      listFolders: (p) => real.listFolders(p),
      delete: (k) => real.delete(k),
      deleteIfMatch: (k, e) => real.deleteIfMatch(k, e),
      putIfAbsent: (k, b, t) => real.putIfAbsent(k, b, t),
      putIfMatch: (k, b, e, t) => real.putIfMatch(k, b, e, t),
      put: async (key, body, type) => {
        if (key.startsWith("cache/embeddings/") && ++puts === 2) throw new Error("S3 is down");
        return real.put(key, body, type);
      },
    };
    await expect(extractFeatures(flaky, extractor, spec(4), images, () => {}, { threads: 1 })).rejects.toThrow("S3 is down");
    // What was written is reused: only the rest is computed again.
    const resumed = await extractFeatures(s3.store, extractor, spec(4), images, () => {}, { threads: 1 });
    expect(resumed.stats.cached).toBeGreaterThanOrEqual(5);
    expect(resumed.stats.cached + resumed.stats.computed + resumed.stats.failed).toBeGreaterThanOrEqual(images.length);
  });
});
