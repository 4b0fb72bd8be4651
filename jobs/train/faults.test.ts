import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPointer, readPromotedModel } from "#shared/artifacts.ts";
import { DatasetError } from "#shared/errors.ts";
import { keys } from "#shared/keys.ts";
import { S3ObjectStore } from "#shared/s3/client.ts";
import { type LocalS3, startLocalS3 } from "../../infra/local/s3-server.ts";
import { uploadSample } from "../../test/support/datasets.ts";
import { startFaultProxy } from "../../test/support/fault-proxy.ts";
import { killWhen, spawnTrainJob } from "../../test/support/jobs.ts";
import { memoryLogger } from "./src/log.ts";
import { train } from "./src/train.ts";

/** Training under faults: S3 errors, duplicate triggers, kills at random points, half-uploaded datasets. */
let s3: LocalS3;
beforeAll(async () => {
  s3 = await startLocalS3();
});
afterAll(async () => {
  await s3?.stop();
});

// Served regardless of held-out accuracy (tiny datasets at 96 px): these tests are about faults, not model quality.
const quick = { imageSize: 96, views: 2, head: { epochs: 10 }, promote: "always" } as const;

/** Every version under models/<name>/ is complete: its metadata verifies and every file it lists is intact. */
async function expectNoPartialVersions(store: S3ObjectStore, name: string): Promise<string[]> {
  const versions = new Set<string>();
  for await (const o of store.list(keys.model(name))) {
    const m = /^models\/[^/]+\/(v[0-9a-f]{12})\//.exec(o.key);
    if (m) versions.add(m[1] as string);
  }
  const { readMetadata, readVerifiedFile } = await import("#shared/artifacts.ts");
  for (const v of versions) {
    const meta = await readMetadata(store, name, v);
    for (const f of meta.files) await readVerifiedFile(store, meta, f.path);
  }
  return [...versions];
}

describe("training faults", () => {
  it("retries transient S3 errors with backoff and leaves no partial version or dangling pointer", async () => {
    await uploadSample(s3.store, "flaky", { perLabel: 8 });
    const proxy = await startFaultProxy(s3.endpoint, { every: 7 });
    try {
      const store = new S3ObjectStore({ ...s3.config, endpoint: proxy.endpoint });
      const result = await train(store, { dataset: "flaky", ...quick }, memoryLogger());
      expect(result.promoted).toBe(true);
      expect(proxy.injected.slowDown + proxy.injected.internal + proxy.injected.reset).toBeGreaterThanOrEqual(5);
      expect(await expectNoPartialVersions(s3.store, "flaky")).toEqual([result.version]);
      expect((await readPromotedModel(s3.store, "flaky")).metadata.version).toBe(result.version);
    } finally {
      await proxy.stop();
    }
  });

  it("the same dataset triggered twice at once yields one version", async () => {
    await uploadSample(s3.store, "twice", { perLabel: 8 });
    const [a, b] = await Promise.all([
      train(s3.store, { dataset: "twice", ...quick }, memoryLogger()),
      train(s3.store, { dataset: "twice", ...quick }, memoryLogger()),
    ]);
    expect([a.status, b.status].sort()).toEqual(["exists", "trained"]);
    expect(a.version).toBe(b.version);
    expect(await expectNoPartialVersions(s3.store, "twice")).toEqual([a.version]);
    expect((await readPromotedModel(s3.store, "twice")).metadata.version).toBe(a.version);
  });

  it("a job killed at random points resumes and produces the same model as an uninterrupted run", async () => {
    // The uninterrupted reference, in a bucket of its own (same dataset name, so same version id).
    const reference = await startLocalS3({ bucket: "reference" });
    await uploadSample(reference.store, "killed", { perLabel: 10 });
    const ref = await train(reference.store, { dataset: "killed", imageSize: 96, views: 2, head: { epochs: 10 }, promote: "always" }, memoryLogger());
    const refWeights = (await readPromotedModel(reference.store, "killed")).metadata.files.find((f) => f.path === "group1-shard1of1.bin")?.sha256;
    await reference.stop();

    // The interrupted runs, in a bucket of their own too: no other test's features are cached there.
    const own = await startLocalS3({ bucket: "killed" });
    try {
      await uploadSample(own.store, "killed", { perLabel: 10 });
      // Three kills at three points of the extraction (30 images, 4 per pack: 8 packs in all), each run
      // picking up the packs the previous ones left. Points by progress, not by clock, so a fast machine
      // cannot finish the job before the kill.
      for (const packs of [2, 4, 6]) {
        const child = spawnTrainJob(own, ["--dataset", "killed", "--image-size", "96", "--views", "2", "--epochs", "10"], { EDGETUNE_PACK_IMAGES: "4" });
        await killWhen(own, child, "cache/embeddings/", (keys) => keys.filter((k) => k.endsWith(".bin")).length >= packs);
      }
      const log = memoryLogger();
      const resumed = await train(own.store, { dataset: "killed", imageSize: 96, views: 2, head: { epochs: 10 }, promote: "always" }, log);
      const features = log.lines.find((l) => l.message === "features done")?.fields as { cached: number; computed: number };
      expect(features.cached).toBeGreaterThanOrEqual(24); // the 6 packs the killed runs left
      expect(resumed.version).toBe(ref.version);
      const weights = (await readPromotedModel(own.store, "killed")).metadata.files.find((f) => f.path === "group1-shard1of1.bin")?.sha256;
      expect(weights).toBe(refWeights);
      expect(resumed.accuracy).toBe(ref.accuracy);
      await expectNoPartialVersions(own.store, "killed");
    } finally {
      await own.stop();
    }
  });

  it("a dataset still uploading when its manifest lands is not trained; complete, it is", async () => {
    const images = await uploadSample(s3.store, "uploading", { perLabel: 6, manifest: {} });
    await s3.store.put(keys.manifest("uploading"), JSON.stringify({ imageCount: images.length + 10 }));
    const err = await train(s3.store, { dataset: "uploading", ...quick }, memoryLogger()).catch((e) => e);
    expect(err).toBeInstanceOf(DatasetError);
    expect(err.message).toMatch(/upload is incomplete/);
    expect(await readPointer(s3.store, "uploading")).toBeNull();
    await s3.store.put(keys.manifest("uploading"), JSON.stringify({ imageCount: images.length }));
    expect((await train(s3.store, { dataset: "uploading", ...quick }, memoryLogger())).promoted).toBe(true);
  });
});

describe("fine-tuning checkpoints", () => {
  it("a job killed during fine-tuning continues after its last finished epoch", async () => {
    await uploadSample(s3.store, "ft-killed", { perLabel: 10 });
    const child = spawnTrainJob(s3, [
      "--dataset",
      "ft-killed",
      "--strategy",
      "finetune",
      "--image-size",
      "96",
      "--views",
      "1",
      "--epochs",
      "5",
      "--fine-tune-epochs",
      "6",
    ]);
    // Kill it after the second epoch's checkpoint is written.
    await killWhen(s3, child, "runs/ft-killed/", (keys) => keys.some((k) => k.endsWith("finetune-e2.bin")));
    await new Promise((r) => setTimeout(r, 200));
    const log = memoryLogger();
    const result = await train(
      s3.store,
      { dataset: "ft-killed", strategy: "finetune", imageSize: 96, views: 1, head: { epochs: 5 }, fineTune: { epochs: 6 } },
      log,
    );
    expect(result.status).toBe("trained");
    const resumedAt = log.lines.find((l) => l.message.startsWith("fine-tuning resumes after epoch"));
    expect(resumedAt?.message).toMatch(/after epoch [1-6]$/);
    const left: string[] = [];
    for await (const o of s3.store.list("runs/ft-killed/")) left.push(o.key);
    expect(left).toEqual([]);
  });
});
