import { existsSync } from "node:fs";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPointer } from "#shared/artifacts.ts";
import { sha256Hex } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import { monitorSummarySchema } from "#shared/monitor.ts";
import { type EdgeWorker, startEdgeWorker } from "../infra/local/edge-worker.ts";
import { type LocalS3, startLocalS3 } from "../infra/local/s3-server.ts";
import { type SampleImage, sampleDataset } from "../jobs/train/src/dataset/sample.ts";
import { memoryLogger } from "../jobs/train/src/log.ts";
import { dispatchNightly } from "../jobs/train/src/nightly.ts";
import { listCaptures, writeCaptureConfig } from "../jobs/train/src/traffic/traffic.ts";
import { train } from "../jobs/train/src/train.ts";
import { postClassify } from "./support/edge.ts";
import { type FaultProxy, startFaultProxy } from "./support/fault-proxy.ts";
import { SHARED_MODELS } from "./support/shared.ts";

/**
 * The traffic loop end to end on the local stack, with real parts only: the worker in workerd (wrangler
 * dev, production config) captures what it answers into the local S3 server; an operator reviews the
 * captures through the worker's console API; the nightly dispatcher moves the accepted ones into the
 * dataset and retrains; the newly served version answers those images better than the one that saw them.
 */
let s3: LocalS3;
let proxy: FaultProxy;
let edge: EdgeWorker;
let traffic: SampleImage[];
let firstVersion: string;
let capturesDown = false;
/** The captures the review decided on: accepted and discarded ids. */
const reviewed = { accepted: [] as string[], discarded: [] as string[] };
let capturesHang = false;
const log = memoryLogger();
// All 40 epochs (no early stopping): with three held-out images per label, when early stopping ends a
// warm-started retrain depends on which captures the split holds out (their ids differ run to run); a CI
// run once stopped it so early that the new version answered like the old one.
const headOptions = { epochs: 40, patience: 40 };
const options = { dataset: "emoji", imageSize: 96 as const, views: 1, head: headOptions, promote: "always" as const };

beforeAll(async () => {
  s3 = await startLocalS3();
  // A small first dataset with a fixed held-out split (train/ 5 per label, val/ 4 per label), so the model
  // has something to learn from its traffic, and accepted captures all go to train/ (applyDecisions): what
  // the retrain learns does not depend on which captures a hash-based split would have held out.
  const pool = await sampleDataset({ perLabel: 19, size: 96 });
  const byLabel = (label: string) => pool.filter((i) => i.label === label);
  traffic = [];
  for (const label of ["animals", "food", "travel"]) {
    const images = byLabel(label);
    for (const [n, img] of images.entries()) {
      if (n < 5) await s3.store.put(`datasets/emoji/train/${img.file}`, img.bytes);
      else if (n < 9) await s3.store.put(`datasets/emoji/val/${img.file}`, img.bytes);
      else traffic.push(img); // the traffic: other emoji of the same groups, none of them in the dataset
    }
  }
  await s3.store.put("datasets/emoji/manifest.json", "{}");
  firstVersion = (await train(s3.store, options, log)).version;
  await writeCaptureConfig(s3.store, "emoji", { enabled: true, belowConfidence: 1.01 });
  // The worker reaches S3 through a proxy that can take the captures/ part of it down.
  proxy = await startFaultProxy(s3.endpoint, {
    every: Number.MAX_SAFE_INTEGER,
    down: (r) => capturesDown && r.path.includes("/captures/"),
    hang: (r) => capturesHang && r.path.includes("/captures/"),
  });
  edge = await startEdgeWorker({ s3Endpoint: proxy.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 1, vars: { COUNTERS_FLUSH_SECONDS: "0" } });
}, 240_000);
afterAll(async () => {
  if (process.env.EDGETUNE_DEBUG_EDGE) process.stderr.write(edge?.output() ?? "");
  await edge?.stop();
  await proxy?.stop();
  await s3?.stop();
});

const auth = () => ({ authorization: `Bearer ${edge.apiKey}` });
async function classify(img: SampleImage, headers: Record<string, string> = {}) {
  const res = await postClassify(edge, "emoji", img, headers);
  expect(res.status).toBe(200);
  return (await res.json()) as { version: string; predictions: { label: string; score: number }[] };
}
async function captureStats() {
  return ((await (await fetch(`${edge.url}/healthz`, { headers: auth() })).json()) as { capture: { captured: number; failed: number; optedOut: number } })
    .capture;
}
async function until<T>(what: () => Promise<T>, ok: (v: T) => boolean, seconds = 30): Promise<T> {
  const end = Date.now() + seconds * 1000;
  for (;;) {
    const v = await what();
    if (ok(v) || Date.now() > end) return v;
    await new Promise((r) => setTimeout(r, 200));
  }
}
const rgba = async (b: Uint8Array) => sharp(b).ensureAlpha().raw().toBuffer();
const trafficPixels: { image: SampleImage; pixels: Buffer }[] = [];
/**
 * The traffic image a stored capture was made from: the edge stores a PNG re-encoded from the pixels it
 * decoded, so the bytes differ, and a JPEG's pixels differ by a grey level or two between its decoder
 * (mozjpeg) and sharp's; the nearest image, within 3 levels on average, is the one.
 */
async function trafficOf(stored: Uint8Array): Promise<SampleImage | undefined> {
  const pixels = await rgba(stored);
  let best: { image?: SampleImage; distance: number } = { distance: 3 };
  for (const t of trafficPixels) {
    if (t.pixels.length !== pixels.length) continue;
    let sum = 0;
    for (let i = 0; i < pixels.length; i++) sum += Math.abs((pixels[i] as number) - (t.pixels[i] as number));
    if (sum / pixels.length < best.distance) best = { image: t.image, distance: sum / pixels.length };
  }
  return best.image;
}

describe("the traffic loop", () => {
  let correctBefore = 0;
  let truthBefore = 0;
  /** The probability a version gives the true label, over the traffic: the loop's measure of "better". */
  const truthScore = (img: SampleImage, body: { predictions: { label: string; score: number }[] }) =>
    body.predictions.find((p) => p.label === img.label)?.score ?? 0;

  it("captures what the edge answers, after the answer, with the prediction and the version", async () => {
    for (const t of traffic) trafficPixels.push({ image: t, pixels: await rgba(t.bytes) });
    // A fresh isolate captures nothing until it has read the model's capture settings (after its first answer).
    await classify(traffic[0] as SampleImage, { "x-edgetune-capture": "off" });
    await until(captureStats, (s) => s !== null);
    await new Promise((r) => setTimeout(r, 300));
    for (const img of traffic) {
      const body = await classify(img);
      expect(body.version).toBe(firstVersion);
      if (body.predictions[0]?.label === img.label) correctBefore++;
      truthBefore += truthScore(img, body) / traffic.length;
    }
    const captures = await until(
      () => listCaptures(s3.store, "emoji"),
      (c) => c.length >= traffic.length,
    );
    expect(captures.length).toBe(traffic.length);
    for (const c of captures) {
      expect(c.version).toBe(firstVersion);
      expect(c.reason).toBe("low_confidence");
      // Stored as a PNG re-encoded from the decoded pixels (never the client's bytes): the same pixels.
      const stored = await s3.store.get(c.image.key);
      expect(c.image.contentType).toBe("image/png");
      expect(await trafficOf(stored as Uint8Array)).toBeDefined();
    }
    // The first model was not perfect on these: there is something to learn.
    expect(correctBefore).toBeLessThan(traffic.length);
  });

  it("stores nothing for a client that opts out", async () => {
    const before = await captureStats();
    await classify(traffic[0] as SampleImage, { "x-edgetune-capture": "off" });
    const after = await until(captureStats, (s) => s.optedOut > before.optedOut);
    expect(after.optedOut).toBe(before.optedOut + 1);
    expect(after.captured).toBe(before.captured);
  });

  it("answers while capture storage hangs: the answers come back while the capture writes are still unanswered", async () => {
    capturesHang = true;
    try {
      for (const img of traffic.slice(0, 4)) {
        const body = await classify(img);
        expect(body.predictions.length).toBeGreaterThan(0);
      }
      // The captures of those answers are still waiting on the bucket (each write has a 10 s deadline).
      expect(proxy.hanging).toBeGreaterThan(0);
    } finally {
      capturesHang = false;
    }
    // And the isolate recovers: the hung writes time out, counted as failures.
    const after = await until(captureStats, (s) => s.failed > 0, 30);
    expect(after.failed).toBeGreaterThan(0);
  });

  it("answers as usual while capture storage is down, and counts the failure", async () => {
    const before = await captureStats();
    capturesDown = true;
    try {
      const body = await classify(traffic[1] as SampleImage);
      expect(body.predictions.length).toBeGreaterThan(0);
      const after = await until(captureStats, (s) => s.failed > before.failed);
      expect(after.failed).toBeGreaterThan(before.failed);
      // (Not "nothing captured meanwhile": captures of the previous test that waited out the hang may
      // still complete within their own deadline, now that storage answers again.)
    } finally {
      capturesDown = false;
    }
  });

  it("lists the review queue to operators, serves the images, and records accept, correct and discard", async () => {
    const res = await fetch(`${edge.url}/v1/models/emoji/captures`, { headers: auth() });
    expect(res.status).toBe(200);
    const queue = (await res.json()) as {
      captures: { id: string; image: { contentType: string }; predictions: { label: string }[] }[];
      settings: { enabled: boolean };
    };
    expect(queue.settings.enabled).toBe(true);
    expect(queue.captures.length).toBe(traffic.length);
    let discarded = 0;
    for (const [i, c] of queue.captures.entries()) {
      const image = await fetch(`${edge.url}/v1/models/emoji/captures/${c.id}/image`, { headers: auth() });
      expect(image.headers.get("content-type")).toBe(c.image.contentType);
      const bytes = new Uint8Array(await image.arrayBuffer());
      expect((await sharp(bytes).metadata()).width).toBe(96);
      const truth = (await trafficOf(bytes)) as SampleImage;
      // The first capture is discarded; every other one is accepted under its true label (a correction
      // where the model was wrong).
      // An accept names the bytes shown (the console's page hashes what it displayed).
      const decision = i === 0 ? { action: "discard" } : { action: "accept", label: truth.label, imageSha256: await sha256Hex(bytes) };
      if (i === 0) discarded++;
      (i === 0 ? reviewed.discarded : reviewed.accepted).push(c.id);
      const r = await fetch(`${edge.url}/v1/models/emoji/captures/${c.id}/decision`, {
        method: "POST",
        headers: { ...auth(), "content-type": "application/json" },
        body: JSON.stringify(decision),
      });
      expect(r.status).toBe(200);
    }
    expect(discarded).toBe(1);
    const bad = await fetch(`${edge.url}/v1/models/emoji/captures/${queue.captures[1]?.id}/decision`, {
      method: "POST",
      headers: { ...auth(), "content-type": "application/json" },
      body: JSON.stringify({ action: "accept" }),
    });
    expect(bad.status).toBe(422);
    expect(((await bad.json()) as { error: { code: string } }).error.code).toBe("invalid_decision");
    // Shown one image, the stored one is another (swapped with the edge's credentials): refused, nothing recorded.
    const target = queue.captures[1] as { id: string };
    const shown = await sha256Hex(new TextEncoder().encode("the bytes shown"));
    const swapped = await fetch(`${edge.url}/v1/models/emoji/captures/${target.id}/decision`, {
      method: "POST",
      headers: { ...auth(), "content-type": "application/json" },
      body: JSON.stringify({ action: "accept", label: "food", imageSha256: shown }),
    });
    expect([swapped.status, ((await swapped.json()) as { error: { code: string } }).error.code]).toEqual([409, "image_changed"]);
    expect((await listCaptures(s3.store, "emoji")).find((c) => c.id === target.id)?.decision?.imageSha256).not.toBe(shown);
  });

  // How much better the retrained version must be was measured on the reference bases; the nsfwjs base a clean
  // clone falls back to learns the icons less well (0.11 instead of > 0.2 mean true-label probability gained).
  it.skipIf(!existsSync(SHARED_MODELS))(
    "moves accepted captures into the dataset at night, retrains, and serves a version that is better on them (needs ../shared/models)",
    async () => {
      const trained: string[] = [];
      // The nightly job checks that console decisions were signed with an operator's key (locally: the one key).
      process.env.EDGETUNE_CONSOLE_KEYS = edge.apiKey;
      const result = await dispatchNightly(
        s3.store,
        { imageSize: 96, views: 1, head: headOptions, promote: "always" },
        async (dataset) => {
          trained.push((await train(s3.store, { ...options, dataset }, log)).version);
          return "local";
        },
        log,
      );
      delete process.env.EDGETUNE_CONSOLE_KEYS;
      expect(result.submitted.map((s) => s.dataset)).toEqual(["emoji"]);
      // Accepted images are in the dataset with their provenance; the review queue is empty.
      const added: string[] = [];
      // (Their applied-markers sit under .edgetune/, the job's own folder: not images.)
      for await (const o of s3.store.list(keys.dataset("emoji"))) if (o.key.includes("/captured-") && !o.key.includes("/.edgetune/")) added.push(o.key);
      for (const id of reviewed.accepted) expect(added.filter((k) => k.includes(`/train/`) && k.includes(`/captured-${id}.`)).length).toBe(1);
      expect(added.length).toBe(traffic.length - 1);
      const head = await s3.store.head(added[0] as string);
      expect(head?.metadata?.["edgetune-captured-from"]).toBe(`emoji@${firstVersion}`);
      // Every reviewed capture has left the queue (the edge may have captured more since).
      const left = (await listCaptures(s3.store, "emoji")).map((c) => c.id);
      for (const id of [...reviewed.accepted, ...reviewed.discarded]) expect(left).not.toContain(id);
      // The new version is served and answers the traffic better than the first did.
      const pointer = await readPointer(s3.store, "emoji");
      expect(pointer?.version).toBe(trained[0]);
      expect(pointer?.version).not.toBe(firstVersion);
      await until(
        () => classify(traffic[0] as SampleImage),
        (b) => b.version === pointer?.version,
        20,
      );
      let correctAfter = 0;
      let truthAfter = 0;
      for (const img of traffic) {
        const body = await classify(img, { "x-edgetune-capture": "off" });
        if (body.predictions[0]?.label === img.label) correctAfter++;
        truthAfter += truthScore(img, body) / traffic.length;
      }
      const report = JSON.parse(new TextDecoder().decode((await s3.store.get(`models/emoji/${pointer?.version}/report.json`)) as Uint8Array)) as {
        history: { head: unknown[] };
        metrics: { accuracy: number; evaluatedOn: number };
      };
      const summary = `top-1 ${correctBefore} → ${correctAfter} of ${traffic.length}, mean true-label probability ${truthBefore.toFixed(3)} → ${truthAfter.toFixed(3)}; new version: ${report.history.head.length} epochs, held-out ${report.metrics.accuracy.toFixed(3)} on ${report.metrics.evaluatedOn}`;
      process.stderr.write(`traffic loop: ${summary}\n`);
      // Most accepted images are trained on (the rest fall into the new version's held-out split, by a hash
      // of their capture ids, which differ run to run). Measured over 3 runs (40 epochs): top-1 18 → 28–30 of
      // 30, mean true-label probability 0.63 → 0.95–1.00; the bounds below leave a wide margin for that spread.
      expect(truthAfter - truthBefore, summary).toBeGreaterThan(0.2);
      expect(correctAfter, summary).toBeGreaterThan(correctBefore + 5);
    },
  );

  // Reads the summary the nightly run of the test above wrote: skipped with it.
  it.skipIf(!existsSync(SHARED_MODELS))(
    "writes a monitoring summary the console reads: the traffic per day against the held-out split (needs ../shared/models)",
    async () => {
      const res = await fetch(`${edge.url}/v1/models/emoji/monitor`, { headers: auth() });
      expect(res.status).toBe(200);
      const summary = monitorSummarySchema.parse(await res.json());
      // All days together (a run that crosses midnight UTC has two).
      const today = summary.days.reduce(
        (a, d) => ({ requests: a.requests + d.requests, lowConfidence: a.lowConfidence + d.lowConfidence, versions: [...a.versions, ...d.versions] }),
        { requests: 0, lowConfidence: 0, versions: [] as string[] },
      );
      expect(today.requests).toBeGreaterThanOrEqual(traffic.length);
      expect(today.versions).toContain(firstVersion);
      expect(summary.reference?.version).toBe(firstVersion);
      // The threshold is the capture setting (1.01: every answer counts as unsure, as on the held-out split).
      expect(summary.threshold).toBe(1.01);
      // Every answer counts as unsure at 1.01, except the isolate's first: it came before the settings were read.
      expect(today.lowConfidence).toBeGreaterThanOrEqual(today.requests - 1);
      expect(summary.reference?.lowConfidence).toBe(1);
    },
  );

  it("stores a large photo with EXIF as a PNG re-encoded to fit 512 px, without its metadata (real workerd codecs)", async () => {
    const photo = new Uint8Array(
      await sharp({ create: { width: 900, height: 600, channels: 3, background: "#6a4" } })
        .composite([{ input: Buffer.from('<svg width="900" height="600"><circle cx="450" cy="300" r="220" fill="#c33"/></svg>') }])
        .withExif({ IFD0: { Copyright: "someone" }, IFD3: { GPSLatitudeRef: "N", GPSLatitude: "48/1 51/1 0/1" } })
        .jpeg()
        .toBuffer(),
    );
    // Sent until stored (an isolate that has just started captures once it has read its settings).
    let stored: Awaited<ReturnType<typeof listCaptures>> = [];
    for (let attempt = 0; attempt < 3 && !stored.some((r) => r.image.width === 512); attempt++) {
      const res = await postClassify(edge, "emoji", { file: "photo.jpg", bytes: photo });
      expect(res.status).toBe(200);
      stored = await until(
        () => listCaptures(s3.store, "emoji"),
        (c) => c.some((r) => r.image.width === 512),
        10,
      );
    }
    const record = stored.find((r) => r.image.width === 512);
    expect(record?.image).toMatchObject({ contentType: "image/png", width: 512, height: 341, resized: true });
    const meta = await sharp((await s3.store.get(record?.image.key as string)) as Uint8Array).metadata();
    expect([meta.format, meta.width, meta.height, meta.exif]).toEqual(["png", 512, 341, undefined]);
  });
});
