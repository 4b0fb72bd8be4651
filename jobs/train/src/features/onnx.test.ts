import { existsSync, readdirSync, readFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import * as tf from "@tensorflow/tfjs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPromotedModel } from "#shared/artifacts.ts";
import { type PreprocessingSpec, preprocess } from "#shared/preprocess.ts";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import { uploadSample } from "../../../../test/support/datasets.ts";
import { DEFAULT_OPTIONS } from "../config.ts";
import { decodeImage } from "../dataset/decode.ts";
import { sampleDataset } from "../dataset/sample.ts";
import { LAYER_NAMES } from "../fit/head.ts";
import { memoryLogger } from "../log.ts";
import { initBackend } from "../model/backend.ts";
import { ensureBase, KNOWN_BASES, loadBase } from "../model/bases.ts";
import { applyBetween } from "../model/graph.ts";
import { toOnnx, UnsupportedLayerError } from "../model/onnx.ts";
import { train } from "../train.ts";
import { extractorFor, featureSpec } from "./extract.ts";
import { createForwardPool, forwardLocal, lazyForwardPool } from "./forward-pool.ts";
import { createOnnxPool } from "./onnx-pool.ts";

/**
 * The ONNX export of each base available offline against tfjs, on real images: the sample Twemoji pictures, and
 * the photos in ../shared/photos where they are. Then a model trained on ONNX Runtime features,
 * served as the tfjs artifact the edge runs: the same top-1 as the head on the ORT features.
 */
let s3: LocalS3;
const SIZE = 96;
const photosDir = join(import.meta.dirname, "../../../../../shared/photos");

async function realInputs(normalization: Parameters<typeof featureSpec>[0]["normalization"]): Promise<Float32Array[]> {
  const images = (await sampleDataset({ perLabel: 3, size: 128 })).map((i) => i.bytes);
  if (existsSync(photosDir)) {
    const files = readdirSync(photosDir, { recursive: true, encoding: "utf8" }).filter((f) => /\.(jpe?g|png)$/i.test(f));
    for (const f of files.slice(0, 6)) images.push(new Uint8Array(readFileSync(join(photosDir, f))));
  }
  const spec: PreprocessingSpec = { version: 2, fit: "center-crop", normalization, background: [255, 255, 255] };
  return Promise.all(images.map(async (b) => preprocess(await decodeImage(b), SIZE, spec)));
}

beforeAll(async () => {
  await initBackend();
  s3 = await startLocalS3();
});
afterAll(async () => {
  await s3?.stop();
});

describe("ONNX export of the frozen base", () => {
  // Every base obtainable offline: from the bases directory (../shared/models, where it exists) or npm.
  const offline = KNOWN_BASES.filter((b) => b.sources.some((s) => s.kind === "nsfwjs" || (s.kind === "dir" && process.env.EDGETUNE_BASES_DIR)));
  for (const id of offline.map((b) => b.id)) {
    it(`${id}: features and fine-tuning maps within 1e-4 of tfjs on real images`, async () => {
      const meta = await ensureBase(s3.store, id);
      const base = await loadBase(s3.store, meta, SIZE);
      const inputs = await realInputs(meta.normalization);
      const data = new Float32Array(inputs.length * SIZE * SIZE * 3);
      inputs.forEach((x, i) => {
        data.set(x, i * SIZE * SIZE * 3);
      });
      const headSpec = featureSpec(meta, { ...DEFAULT_OPTIONS, strategy: "head" }).pooledSpec;
      for (const [layer, pooled, model] of [
        [meta.featureLayer, true, extractorFor(base, headSpec)], // with the base's pooledLayers, if any
        [meta.featureLayer, true, extractorFor(base, { layer: meta.featureLayer })],
        [meta.fineTuneFrom as string, false, extractorFor(base, { layer: meta.fineTuneFrom as string })],
      ] as const) {
        const ref = forwardLocal(model, data, inputs.length, SIZE, pooled);
        const pool = await createOnnxPool(model, { size: SIZE, pooled });
        const got = await pool.run(data.slice(), inputs.length);
        await pool.close();
        expect(got.shape).toEqual(ref.shape);
        let worst = 0;
        let scale = 1;
        got.values.forEach((v, i) => {
          const r = ref.values[i] as Float32Array;
          for (let j = 0; j < v.length; j++) {
            worst = Math.max(worst, Math.abs((v[j] as number) - (r[j] as number)));
            scale = Math.max(scale, Math.abs(r[j] as number));
          }
        });
        // float32 rounding grows with the values: 1e-4 of the largest feature (ReLU6 maps reach 6).
        expect(worst, `${id} ${layer}`).toBeLessThanOrEqual(1e-4 * scale);
      }
      base.dispose();
    });
  }

  it("refuses a layer it has no export for, by name; extraction then falls back to tfjs and says why", async () => {
    const input = tf.input({ shape: [8, 8, 3] });
    const out = tf.layers.conv2dTranspose({ filters: 2, kernelSize: 3, name: "upsample" }).apply(input) as tf.SymbolicTensor;
    const model = tf.model({ inputs: input, outputs: out });
    expect(() => toOnnx(model, { size: 8, pooled: true })).toThrow(UnsupportedLayerError);
    expect(() => toOnnx(model, { size: 8, pooled: true })).toThrow(/upsample \(Conv2DTranspose\)/);
    const pool = await createForwardPool(model, { size: 8, pooled: true, threads: 1 });
    try {
      expect(pool.engine).toBe(`tfjs-${tf.getBackend()}`);
      expect(pool.fallback).toMatch(/upsample \(Conv2DTranspose\)/);
      expect((await pool.run(new Float32Array(8 * 8 * 3), 1)).shape).toEqual([2]);
    } finally {
      await pool.close();
    }
    // The lazy pool (what training uses) reports the created pool's engine, threads and reason once ready.
    const lazy = lazyForwardPool(model, { size: 8, pooled: true });
    try {
      await lazy.ready?.();
      expect([lazy.engine, lazy.threads, lazy.fallback]).toEqual([`tfjs-${tf.getBackend()}`, availableParallelism(), expect.stringMatching(/upsample/)]);
    } finally {
      await lazy.close();
    }
  });
});

describe("trained on ONNX Runtime features, served by tfjs", () => {
  it("the exported classifier's top-1 equals the head's on the ORT features, image by image", async () => {
    const images = await uploadSample(s3.store, "ort", { perLabel: 10, size: 128 });
    const r = await train(s3.store, { dataset: "ort", imageSize: SIZE, views: 1, head: { epochs: 10 }, promote: "always" }, memoryLogger());
    expect(r.report?.phases.find((p) => p.name === "features")?.detail).toMatchObject({ engine: "onnxruntime" });
    const { metadata, files } = await readPromotedModel(s3.store, "ort");
    const { loadModel } = await import("../model/io.ts");
    const served = await loadModel(files.get("model.json") as Uint8Array, files);
    // The head alone (everything after the pooling layer), fed with ORT features of the base.
    const dim = (served.getLayer(LAYER_NAMES.pool).outputShape as number[])[1] as number;
    const headInput = tf.input({ shape: [dim] });
    const head = tf.model({ inputs: headInput, outputs: applyBetween(served, headInput, served.outputLayers[0]?.name as string, LAYER_NAMES.pool) });
    const meta = await ensureBase(s3.store, metadata.base.id);
    const base = await loadBase(s3.store, meta, SIZE);
    const extractor = extractorFor(base, { layer: metadata.base.featureLayer, pooledLayers: metadata.base.pooledLayers });
    const pool = await createOnnxPool(extractor, { size: SIZE, pooled: true });
    let same = 0;
    for (const img of images) {
      const x = preprocess(await decodeImage(img.bytes), SIZE, metadata.preprocessing);
      const [features] = (await pool.run(x.slice(), 1)).values as [Float32Array];
      const viaOrt = tf.tidy(() => (head.predict(tf.tensor2d(features, [1, dim])) as tf.Tensor).argMax(-1).dataSync()[0]);
      const viaTfjs = tf.tidy(() => (served.predict(tf.tensor4d(x, [1, SIZE, SIZE, 3])) as tf.Tensor).argMax(-1).dataSync()[0]);
      if (viaOrt === viaTfjs) same++;
    }
    await pool.close();
    expect(same).toBe(images.length);
  });
});
