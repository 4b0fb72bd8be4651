import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import * as tf from "@tensorflow/tfjs";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { EdgetuneError, IntegrityError, InvalidOptionError } from "#shared/errors.ts";
import { keys } from "#shared/keys.ts";
import { preprocess } from "#shared/preprocess.ts";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import { SHARED, SHARED_MODELS } from "../../../../test/support/shared.ts";
import { decodeImage } from "../dataset/decode.ts";
import { argmax } from "../release/evaluate.ts";
import { initBackend } from "./backend.ts";
import { AUTO_DESCRIPTION, ensureBase, importBase, loadBase } from "./bases.ts";
import { loadModel } from "./io.ts";

let s3: LocalS3;
beforeAll(async () => {
  await initBackend();
  s3 = await startLocalS3();
});
afterAll(async () => {
  await s3?.stop();
});

describe("bases", () => {
  it("stores the nsfwjs MobileNetV2 (installed with the project) cut at its feature layer, and loads it at any size", async () => {
    const meta = await ensureBase(s3.store, "nsfwjs-mobilenet-v2");
    expect(meta).toMatchObject({ id: "nsfwjs-mobilenet-v2", featureLayer: "block_16_project_BN", normalization: "0-1", fineTuneFrom: "block_12_add" });
    for (const size of [96, 160]) {
      const model = await loadBase(s3.store, meta, size);
      expect(model.outputs[0]?.shape).toEqual([null, size / 32, size / 32, 320]);
      // BatchNorm is folded into the convolutions on load.
      expect(model.layers.some((l) => l.getClassName() === "BatchNormalization")).toBe(false);
      model.dispose();
    }
    expect((await ensureBase(s3.store, "nsfwjs-mobilenet-v2")).sha256).toBe(meta.sha256); // idempotent
  });

  it.skipIf(!existsSync(SHARED_MODELS))(
    "reads the clean ImageNet bases from the bases directory, offline, with their licences (needs ../shared/models)",
    async () => {
      const pixels = await decodeImage(
        new Uint8Array(
          await sharp({ create: { width: 64, height: 64, channels: 3, background: "#c33" } })
            .png()
            .toBuffer(),
        ),
      );
      for (const [id, layer, channels] of [
        ["darknet-tiny", "conv2d_16", 1000],
        ["mobilenet-v1-025", "conv_pw_13_relu", 256],
        ["mobilenet-v2-slim-100", "out_relu", 1280],
      ] as const) {
        const meta = await ensureBase(s3.store, id);
        expect(meta).toMatchObject({ id, featureLayer: layer });
        expect(meta.licence).toMatch(/MIT|Apache-2.0/);
        expect(meta.source).toMatch(new RegExp(`^bases directory ${SHARED_MODELS}/\\w.*\\(EDGETUNE_BASES_DIR\\)$`));
        const model = await loadBase(s3.store, meta, 96);
        expect(model.outputs[0]?.shape?.[3]).toBe(channels);
        // Real weights: features of an image are not constant over the channels.
        const input = preprocess(pixels, 96, { version: 1, fit: "center-crop", normalization: meta.normalization });
        const features = tf.tidy(() => tf.mean(model.predict(tf.tensor4d(input, [1, 96, 96, 3])) as tf.Tensor, [0, 1, 2]));
        const values = (await features.data()) as Float32Array;
        features.dispose();
        expect(Math.max(...values) - Math.min(...values)).toBeGreaterThan(0.01);
        model.dispose();
      }
    },
  );

  it("refuses a tampered base", async () => {
    const s3b = await startLocalS3({ bucket: "tamper" });
    try {
      const meta = await ensureBase(s3b.store, "nsfwjs-mobilenet-v2");
      const key = `${keys.base(meta.id)}group1-shard1of1.bin`;
      const bytes = (await s3b.store.get(key)) as Uint8Array;
      bytes[100] = (bytes[100] as number) ^ 0xff;
      await s3b.store.put(key, bytes);
      await expect(loadBase(s3b.store, meta, 96)).rejects.toBeInstanceOf(IntegrityError);
    } finally {
      await s3b.stop();
    }
  });

  const repo = join(import.meta.dirname, "../../../..");
  it.skipIf(!existsSync(join(repo, ".git")))(
    "no model weights are committed: every base comes from the bucket, a bases directory, its publisher or npm",
    () => {
      const tracked = execFileSync("git", ["ls-files", "-z"], { cwd: repo, encoding: "utf8" }).split("\0").filter(Boolean);
      const weights = tracked.filter((f) => /(^|\/)group\d+-shard\d+of\d+(\.bin)?$|\.(bin|onnx|h5|npy|pb)$/.test(f) || /(^|\/)weights?\.bin$/.test(f));
      expect(weights).toEqual([]);
    },
  );

  it('states the default once: README\'s intro and its "Which base model?" say what `base list` and `train --help` say', () => {
    const readme = readFileSync(join(repo, "README.md"), "utf8").replaceAll("`", "").replace(/\s+/g, " ");
    expect(readme).toContain(`The default is auto: ${AUTO_DESCRIPTION}.`);
    expect(readme).toContain("by default auto: the best clean ImageNet MobileNetV2 available, else Tiny Darknet, else the nsfwjs MobileNetV2");
    expect(readme).not.toMatch(/Tiny Darknet by default|bundled base/);
  });

  it("rejects an unknown base with the list of valid ones", async () => {
    const err = await ensureBase(s3.store, "resnet-9000").catch((e) => e);
    expect(err).toBeInstanceOf(InvalidOptionError);
    expect(err.message).toMatch(
      /mobilenet-v2-slim-100, mobilenet-v2-100, mobilenet-v2-075, mobilenet-v2-050, mobilenet-v2-035, darknet-tiny, mobilenet-v1-025, nsfwjs-mobilenet-v2/,
    );
  });

  it("says in plain words why a named base cannot be had offline, and what to do", async () => {
    const saved = process.env.EDGETUNE_BASES_DIR;
    delete process.env.EDGETUNE_BASES_DIR;
    const empty = await startLocalS3({ bucket: "empty" });
    try {
      const err = await ensureBase(empty.store, "darknet-tiny").catch((e: unknown) => e);
      expect(err).toBeInstanceOf(EdgetuneError);
      expect((err as EdgetuneError).code).toBe("base_unreachable");
      expect((err as Error).message).toBe(
        "Base darknet-tiny is not in the bucket and none of its sources is available: no bases directory (EDGETUNE_BASES_DIR is not set); downloads are off (EDGETUNE_OFFLINE). Set EDGETUNE_BASES_DIR to a folder holding darknet_tiny/, or allow the download.",
      );
    } finally {
      await empty.stop();
      if (saved) process.env.EDGETUNE_BASES_DIR = saved;
    }
  });

  const v1 = join(SHARED_MODELS, "mobilenet_v1_0.25_224");
  const photo = join(SHARED, "photos/tfjs-models/mobilenet_demo_coffee.jpg");
  it.skipIf(!existsSync(v1) || !existsSync(photo))(
    "imports a Keras-style ImageNet model from a folder; its weights classify a real photo correctly (needs ../shared)",
    async () => {
      const meta = await importBase(
        s3.store,
        { kind: "dir", path: v1 },
        { id: "mobilenet-v1-025", featureLayer: "conv_pw_13_relu", normalization: "minus1-1" },
      );
      expect(meta.files.map((f) => f.path)).toEqual(["model.json", "group1-shard1of1.bin"]);
      // Top-1 sanity of the full classifier with edgetune's own decoding and preprocessing.
      const json = readFileSync(join(v1, "model.json"));
      const manifest = JSON.parse(json.toString()) as { weightsManifest: { paths: string[] }[] };
      const shards = new Map(manifest.weightsManifest.flatMap((g) => g.paths).map((p) => [p, new Uint8Array(readFileSync(join(v1, p)))]));
      const full = await loadModel(new Uint8Array(json), shards);
      const input = preprocess(await decodeImage(new Uint8Array(readFileSync(photo))), 224, { version: 1, fit: "center-crop", normalization: "minus1-1" });
      const top1 = argmax(tf.tidy(() => (full.predict(tf.tensor4d(input, [1, 224, 224, 3])) as tf.Tensor).reshape([-1]).dataSync()));
      expect([967, 968, 504]).toContain(top1); // espresso, cup, coffee mug
      full.dispose();
    },
  );
});
