import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readMetadata } from "#shared/artifacts.ts";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import { uploadSample } from "../../../../test/support/datasets.ts";
import { mulberry32 } from "../dataset/augment.ts";
import { memoryLogger } from "../log.ts";
import { train } from "../train.ts";
import { initBackend } from "./backend.ts";
import { crossValidate } from "./choose-base.ts";

/** `--base best` on a real dataset and real bases (those in ../shared/models, and the nsfwjs one that installs with the project). */
let s3: LocalS3;
beforeAll(async () => {
  await initBackend();
  s3 = await startLocalS3();
});
afterAll(async () => {
  await s3?.stop();
});

describe("base best", () => {
  it("scores every base available offline by cross-validation on the training split, trains on the best, and records every score", async () => {
    await uploadSample(s3.store, "emoji", { perLabel: 10, size: 96 });
    const options = { dataset: "emoji", base: "best", imageSize: 96, views: 1, head: { epochs: 5 }, promote: "always" } as const;
    const r = await train(s3.store, options, memoryLogger());
    const meta = await readMetadata(s3.store, "emoji", r.version);
    const reason = meta.base.choice?.reason ?? "";
    expect(meta.base.choice?.requested).toBe("best");
    const scores = [...reason.matchAll(/([a-z0-9-]+) (\d+\.\d) %/g)].map((m) => ({ id: m[1] as string, accuracy: Number(m[2]) }));
    const offline = process.env.EDGETUNE_BASES_DIR ? ["darknet-tiny", "mobilenet-v1-025", "mobilenet-v2-slim-100"] : [];
    expect(scores.map((s) => s.id).sort()).toEqual([...offline, "nsfwjs-mobilenet-v2"]);
    const best = Math.max(...scores.map((s) => s.accuracy));
    expect(scores.find((s) => s.id === meta.base.id)?.accuracy).toBe(best);
    // The same data and options: the same version, whatever base it chose.
    expect((await train(s3.store, options, memoryLogger())).status).toBe("exists");
  });

  it("cross-validates a separable problem near 100 % and a random one near chance", async () => {
    const rand = mulberry32(1);
    const separable = Array.from({ length: 60 }, (_, i) => ({ x: Float32Array.from({ length: 8 }, (_, d) => (d === i % 3 ? 3 : 0) + rand()), y: i % 3 }));
    const noise = Array.from({ length: 60 }, (_, i) => ({ x: Float32Array.from({ length: 8 }, () => rand()), y: i % 3 }));
    expect(await crossValidate(separable, 3, 42)).toBeGreaterThan(0.95);
    expect(await crossValidate(noise, 3, 42)).toBeLessThan(0.6);
  });
});
