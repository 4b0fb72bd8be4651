import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPointer } from "#shared/artifacts.ts";
import { keys } from "#shared/keys.ts";
import { Dispatcher } from "../infra/local/dispatcher.ts";
import { type EdgeWorker, startEdgeWorker } from "../infra/local/edge-worker.ts";
import { type LocalS3, startLocalS3 } from "../infra/local/s3-server.ts";
import { pushDataset } from "../jobs/train/src/catalog/catalog.ts";
import { type SampleImage, sampleDataset } from "../jobs/train/src/dataset/sample.ts";
import { postClassify } from "./support/edge.ts";

/**
 * The whole loop, as a user lives it: push a folder → the dispatcher (the EventBridge rule's local
 * twin) runs the training job through its CLI → the model is promoted → the worker in real workerd
 * classifies images it never saw → more images → retrain → the worker serves the new version without
 * a restart → a bad upload trains a worse model → the current one stays.
 */
let s3: LocalS3;
let edge: EdgeWorker;
let dispatcher: Dispatcher;
let work: string;
let train: SampleImage[];
let heldOut: SampleImage[];

// 3 labels: chance is 1/3. At least 7 of the 12 held-out images right: by chance that happens with
// p ≈ 0.066 (binomial). One image is 8 points here, and which images a model this small gets right
// moves with any change of the shuffle order, so the bar is "clearly above chance", not a tuned score.
const MIN_HELD_OUT_ACCURACY = 7 / 12;

beforeAll(async () => {
  s3 = await startLocalS3();
  // Training is deterministic (seeded splits, init, shuffles and augmentation; float16-rounded
  // features), so these outcomes repeat run after run. The 10 % promotion tolerance is what 12–15
  // held-out images can resolve: one image is 7–8 points.
  dispatcher = new Dispatcher({
    store: s3.store,
    s3: s3.config,
    pollMs: 200,
    // The outcomes below were tuned on this base at 96 px (the default base is tested in train.test.ts).
    trainArgs: ["--image-size", "96", "--views", "2", "--json", "--promotion-tolerance", "0.1", "--base", "nsfwjs-mobilenet-v2"],
    output: "collect",
  });
  dispatcher.start();
  work = await mkdtemp(join(tmpdir(), "edgetune-e2e-"));
  train = await sampleDataset({ perLabel: 15, size: 96 });
  const unseen = (await sampleDataset({ perLabel: 30, size: 96 })).filter((h) => !train.some((t) => t.file === h.file));
  heldOut = ["animals", "food", "travel"].flatMap((l) => unseen.filter((h) => h.label === l).slice(0, 4));
});
afterAll(async () => {
  await dispatcher?.stop();
  await edge?.stop();
  await s3?.stop();
  if (work) await rm(work, { recursive: true, force: true });
});

async function writeFolder(dir: string, images: { file: string; bytes: Uint8Array }[]): Promise<void> {
  for (const i of images) {
    await mkdir(dirname(join(dir, i.file)), { recursive: true });
    await writeFile(join(dir, i.file), i.bytes);
  }
}

async function settle(): Promise<void> {
  await new Promise((r) => setTimeout(r, 500)); // let the dispatcher see the new manifest
  await dispatcher.idle();
}

async function classifyAll(images: SampleImage[]): Promise<{ accuracy: number; versions: Set<string> }> {
  let correct = 0;
  const versions = new Set<string>();
  for (const img of images) {
    const res = await postClassify(edge, "emoji", img);
    expect(res.status).toBe(200);
    const body = (await res.json()) as { version: string; predictions: { label: string }[] };
    versions.add(body.version);
    if (body.predictions[0]?.label === img.label) correct++;
  }
  return { accuracy: correct / images.length, versions };
}

describe("end to end", () => {
  it("push → train → promote → classify held-out images at the edge", async () => {
    const folder = join(work, "emoji");
    await writeFolder(folder, train);
    const pushed = await pushDataset(s3.store, folder, "emoji");
    expect(pushed.uploaded).toBe(train.length);
    await settle();
    const job = dispatcher.jobs.at(-1);
    expect(job).toMatchObject({ dataset: "datasets/emoji/manifest.json", reason: "dataset-complete", status: "succeeded" });
    expect(job?.results[0]).toMatchObject({ model: "emoji", promoted: true });

    edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 1 });
    const { accuracy, versions } = await classifyAll(heldOut);
    expect([...versions]).toEqual([job?.results[0]?.version]);
    expect(accuracy).toBeGreaterThanOrEqual(MIN_HELD_OUT_ACCURACY);
  });

  it("more images for a label → retrain → the running worker serves the new version", async () => {
    const before = await readPointer(s3.store, "emoji");
    const extra = (await sampleDataset({ perLabel: 25, size: 96 }))
      .filter((i) => i.label === "food" && !train.some((t) => t.file === i.file) && !heldOut.some((h) => h.file === i.file))
      .slice(0, 5);
    expect(extra.length).toBe(5);
    await writeFolder(join(work, "emoji"), extra);
    await pushDataset(s3.store, join(work, "emoji"), "emoji");
    await settle();
    const job = dispatcher.jobs.at(-1);
    expect(job?.status).toBe("succeeded");
    expect(job?.results[0]?.promoted).toBe(true);
    const after = await readPointer(s3.store, "emoji");
    expect(after?.version).not.toBe(before?.version);
    expect(after?.previous).toBe(before?.version);

    await new Promise((r) => setTimeout(r, 1100)); // the worker's pointer TTL
    await classifyAll(heldOut.slice(0, 1)); // triggers the background check
    await new Promise((r) => setTimeout(r, 1500));
    const { versions, accuracy } = await classifyAll(heldOut);
    expect([...versions]).toEqual([after?.version]);
    expect(accuracy).toBeGreaterThanOrEqual(MIN_HELD_OUT_ACCURACY);
  });

  it("a bad upload into another dataset's model is refused before training; the edge keeps serving the current one", async () => {
    const current = await readPointer(s3.store, "emoji");
    // A broken export: every training image came out as a flat grey square (correct validation images).
    const folder = join(work, "bad");
    await writeFolder(
      folder,
      await Promise.all(
        train.map(async (i, n) => ({
          file: `train/${i.file.replace(/\.jpg$/, ".png")}`,
          bytes: new Uint8Array(
            await sharp({ create: { width: 96, height: 96, channels: 3, background: { r: 120 + (n % 40), g: 120, b: 120 } } })
              .png()
              .toBuffer(),
          ),
        })),
      ),
    );
    await writeFolder(
      folder,
      heldOut.map((i) => ({ file: `val/${i.file}`, bytes: i.bytes })),
    );
    await pushDataset(s3.store, folder, "emoji-bad-upload", { model: "emoji" });
    await settle();
    const job = dispatcher.jobs.at(-1);
    // The model belongs to dataset emoji (release/ownership.ts); a worse model from its own dataset is kept
    // back by the promotion rules (jobs/train/train.test.ts).
    expect(job?.status).toBe("failed");
    expect(job?.logTail).toMatch(/Model emoji belongs to dataset emoji .*--take-over/);
    expect((await readPointer(s3.store, "emoji"))?.version).toBe(current?.version);
    // The mistake undone as a user would: that upload is no complete dataset any more.
    await s3.store.delete([keys.manifest("emoji-bad-upload")]);
    await new Promise((r) => setTimeout(r, 1100));
    const { versions } = await classifyAll(heldOut.slice(0, 3));
    expect([...versions]).toEqual([current?.version]);
  });

  it("the nightly run retrains every dataset and changes nothing when no data changed", async () => {
    const before = await readPointer(s3.store, "emoji");
    dispatcher.submit("*", "nightly");
    await dispatcher.idle();
    const job = dispatcher.jobs.at(-1);
    expect(job?.status, job?.logTail).toBe("succeeded");
    expect(job?.results.map((r) => r.status).sort()).toEqual(["exists"]);
    expect((await readPointer(s3.store, "emoji"))?.version).toBe(before?.version);
  });

  it("a dataset pushed again unchanged gets a run (as S3 sends an event for every write), which finds it trained", async () => {
    const jobs = dispatcher.jobs.length;
    const manifest = await s3.store.get(keys.manifest("emoji"));
    await new Promise((r) => setTimeout(r, 1100)); // S3 list times have a resolution of a second at worst
    await s3.store.put(keys.manifest("emoji"), manifest as Uint8Array); // the same bytes: the same ETag
    await settle();
    expect(dispatcher.jobs.length).toBe(jobs + 1);
    expect(dispatcher.jobs.at(-1)?.results.map((r) => r.status)).toEqual(["exists"]);
  });
});
