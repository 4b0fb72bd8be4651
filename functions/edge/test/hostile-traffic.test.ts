import { deflateSync } from "node:zlib";
import sharp, { type Sharp } from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type CaptureRecord, noCounts } from "#shared/contracts/capture.ts";
import { keys } from "#shared/keys.ts";
import { type EdgeWorker, startEdgeWorker } from "../../../infra/local/edge-worker.ts";
import { type LocalS3, startLocalS3 } from "../../../infra/local/s3-server.ts";
import { memoryLogger } from "../../../jobs/train/src/log.ts";
import { listCaptures, writeCaptureConfig } from "../../../jobs/train/src/traffic/traffic.ts";
import { train } from "../../../jobs/train/src/train.ts";
import { moveAfterFirstScan, pngChunk, pngWithChunk, secondApp0, webpWithChunk, withTrailer } from "../../../test/support/crafted-images.ts";
import { uploadSample } from "../../../test/support/datasets.ts";
import { postClassify } from "../../../test/support/edge.ts";

/**
 * Issue #26 against the real worker (workerd, production config) and the local S3 server: what the edge
 * stores of a client's image, what the review listing reads from captures/ (which the edge's own key may
 * write), and what a caller without an operator key learns from /healthz and a model's description.
 */
let s3: LocalS3;
let edge: EdgeWorker;
let images: Awaited<ReturnType<typeof uploadSample>>;
const CLIENT_KEY = "client-key-for-tests";
const SECRET = "GPS-48.8584N-2.2945E-secret";

beforeAll(async () => {
  s3 = await startLocalS3();
  images = await uploadSample(s3.store, "emoji", { perLabel: 6, size: 96 });
  await train(s3.store, { dataset: "emoji", imageSize: 96, views: 1, head: { epochs: 3 }, promote: "always" }, memoryLogger());
  await writeCaptureConfig(s3.store, "emoji", { enabled: true, belowConfidence: 1.01, maxPerDay: 1000 });
  // A client key apart from the operator's (edge.apiKey, also CONSOLE_API_KEYS).
  edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 1, vars: { API_KEYS: CLIENT_KEY } });
}, 240_000);
afterAll(async () => {
  await edge?.stop();
  await s3?.stop();
});

const operator = () => ({ authorization: `Bearer ${edge.apiKey}` });
const client = () => ({ authorization: `Bearer ${CLIENT_KEY}` });

/** Waits for the capture of the request just answered: the record the queue did not hold before. */
async function nextCapture(seen: Set<string>): Promise<CaptureRecord> {
  for (let i = 0; i < 100; i++) {
    const fresh = (await listCaptures(s3.store, "emoji")).find((c) => !seen.has(c.id));
    if (fresh) {
      seen.add(fresh.id);
      return fresh;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error("no capture was stored");
}

/** The chunk types of a PNG, and whether anything follows IEND. */
function pngChunks(png: Uint8Array): { types: string[]; trailing: number } {
  const view = new DataView(png.buffer, png.byteOffset, png.byteLength);
  const types: string[] = [];
  let p = 8;
  while (p + 8 <= png.length) {
    const type = new TextDecoder().decode(png.subarray(p + 4, p + 8));
    types.push(type);
    p += 12 + view.getUint32(p);
    if (type === "IEND") break;
  }
  return { types, trailing: png.length - p };
}

describe("what the edge stores of a client's image", () => {
  it("is a PNG re-encoded from the pixels: none of 10 places where files carry metadata survives", async () => {
    const picture = sharp({ create: { width: 240, height: 160, channels: 3, background: "#6a4" } }).composite([
      { input: Buffer.from('<svg width="240" height="160"><circle cx="120" cy="80" r="60" fill="#c33"/></svg>') },
    ]);
    const exif = { IFD0: { Copyright: SECRET }, IFD3: { GPSLatitudeRef: "N", GPSLatitude: "48/1 51/1 30/1" } };
    const bytes = async (s: Sharp) => new Uint8Array(await s.toBuffer());
    const jpeg = await bytes(picture.clone().jpeg());
    const png = await bytes(picture.clone().png());
    const text = new TextEncoder().encode(SECRET);
    const variants: [string, Uint8Array, string][] = [
      ["EXIF with GPS in APP1 before the frame", await bytes(picture.clone().withExif(exif).jpeg()), "image/jpeg"],
      [
        "EXIF with GPS after the first scan of a progressive JPEG",
        moveAfterFirstScan(await bytes(picture.clone().withExif(exif).jpeg({ progressive: true })), 0xe1),
        "image/jpeg",
      ],
      ["bytes after JPEG EOI", withTrailer(jpeg, SECRET), "image/jpeg"],
      ["a second APP0 with text", secondApp0(jpeg, SECRET), "image/jpeg"],
      ["bytes after PNG IEND", withTrailer(png, SECRET), "image/png"],
      ["a PNG eXIf chunk", pngWithChunk(png, pngChunk("eXIf", new Uint8Array([0x4d, 0x4d, 0, 0x2a, 0, 0, 0, 8, ...text]))), "image/png"],
      ["a PNG iCCP chunk", pngWithChunk(png, pngChunk("iCCP", new Uint8Array([...new TextEncoder().encode("icc"), 0, 0, ...deflateSync(text)]))), "image/png"],
      ["a private PNG chunk", pngWithChunk(png, pngChunk("prVt", text)), "image/png"],
      ["a WebP ICCP chunk", await bytes(picture.clone().withIccProfile("p3").webp()), "image/webp"],
      ["an unknown WebP chunk", webpWithChunk(await bytes(picture.clone().withIccProfile("p3").webp()), "SCRT", text), "image/webp"],
    ];
    // A fresh isolate captures once it has read the model's settings (after its first answer).
    await postClassify(edge, "emoji", { file: "x.jpg", bytes: jpeg }, { "x-edgetune-capture": "off" });
    await new Promise((r) => setTimeout(r, 500));
    const seen = new Set((await listCaptures(s3.store, "emoji")).map((c) => c.id));
    const problems: string[] = [];
    for (const [what, body, type] of variants) {
      const res = await postClassify(edge, "emoji", { file: "x", bytes: body }, { "content-type": type });
      expect(res.status, what).toBe(200);
      const record = await nextCapture(seen);
      const stored = (await s3.store.get(record.image.key)) as Uint8Array;
      const { types, trailing } = pngChunks(stored);
      const meta = await sharp(stored).metadata();
      if (record.image.contentType !== "image/png" || meta.format !== "png") problems.push(`${what}: stored as ${record.image.contentType}`);
      if (types.some((t) => !["IHDR", "IDAT", "IEND"].includes(t))) problems.push(`${what}: chunks ${types.join(" ")}`);
      if (trailing !== 0) problems.push(`${what}: ${trailing} bytes after IEND`);
      if (Buffer.from(stored).includes(SECRET)) problems.push(`${what}: the secret is in the stored file`);
      if (meta.exif || meta.icc || meta.xmp || meta.comments) problems.push(`${what}: sharp reads metadata in it`);
      expect([meta.width, meta.height], what).toEqual([240, 160]);
    }
    if (problems.length) process.stderr.write(`${problems.join("\n")}\n`);
    expect(problems).toEqual([]);
  });
});

describe("the daily cap", () => {
  it("raised mid-day reaches an isolate that had already reached the old one", async () => {
    const today = new Date().toISOString().slice(0, 10);
    const stats = async () =>
      ((await (await fetch(`${edge.url}/healthz`, { headers: operator() })).json()) as { capture: { captured: number; overCap: number } }).capture;
    const used = async () => {
      const quota = await s3.store.get(keys.captureQuota("emoji", today));
      return quota ? (JSON.parse(new TextDecoder().decode(quota)) as { count: number }).count : 0;
    };
    const send = async (headers: Record<string, string> = {}) =>
      expect((await postClassify(edge, "emoji", images[1] as (typeof images)[number], headers)).status).toBe(200);
    /** New settings reach the isolate on the first answer after their TTL (an opted-out one: nothing stored). */
    const settle = async () => {
      await new Promise((r) => setTimeout(r, 1100));
      await send({ "x-edgetune-capture": "off" });
      await new Promise((r) => setTimeout(r, 300));
    };
    // The cap is what the day's quota has handed out already: once the isolate's lease is spent, the day is full.
    await writeCaptureConfig(s3.store, "emoji", { maxPerDay: await used() });
    await settle();
    for (let i = 0; i < 25 && (await stats()).overCap === 0; i++) {
      await send();
      await new Promise((r) => setTimeout(r, 200));
    }
    const full = await stats();
    expect(full.overCap).toBeGreaterThan(0);
    // Raised: the same isolate captures again.
    await writeCaptureConfig(s3.store, "emoji", { maxPerDay: (await used()) + 5 });
    await settle();
    await send();
    for (let i = 0; i < 50 && (await stats()).captured === full.captured; i++) await new Promise((r) => setTimeout(r, 100));
    expect((await stats()).captured).toBeGreaterThan(full.captured);
  });
});

describe("the review listing reads captures/ with bounds (the edge's key may write there)", () => {
  // Today: the listing reads the retention window's days, built from dates.
  const day = new Date().toISOString().slice(0, 10);
  const stamp = day.replaceAll("-", "");
  const record = (id: string, extra: object = {}) => ({
    schemaVersion: 1,
    id,
    model: "emoji",
    version: "v0123456789ab",
    capturedAt: `${day}T10:00:00.000Z`,
    reason: "low_confidence",
    predictions: [{ label: "food", score: 0.4 }],
    image: { key: keys.captureFile("emoji", day, id, "png"), contentType: "image/png", bytes: 10, width: 10, height: 10, resized: false },
    ...extra,
  });
  const listing = async () => {
    const res = await fetch(`${edge.url}/v1/models/emoji/captures`, { headers: operator() });
    expect(res.status).toBe(200);
    const text = await res.text();
    return { text, captures: (JSON.parse(text) as { captures: { id: string }[] }).captures };
  };

  it("skips huge forged records (8 MB each, valid otherwise): the response stays small", async () => {
    const huge = "x".repeat(8 * 1024 * 1024);
    for (let i = 0; i < 3; i++) {
      const id = `${stamp}T235900-huge000${i}`;
      await s3.store.put(keys.captureRecord("emoji", id), JSON.stringify(record(id, { predictions: [{ label: huge, score: 0.4 }] })));
    }
    const { text, captures } = await listing();
    expect(captures.filter((c) => c.id.includes("huge"))).toEqual([]);
    expect(text.length).toBeLessThan(300 * 1024);
    process.stderr.write(`review listing with forged records: ${text.length} bytes, workerd peak ${edge.memoryMb().peak} MB\n`);
    // The image route refuses a record it would not list (422, not an 8 MB read).
    const image = await fetch(`${edge.url}/v1/models/emoji/captures/${stamp}T235900-huge0000/image`, { headers: operator() });
    expect(image.status).toBe(422);
  });

  it("lists a record once, under its own key only, and skips day folders dated in the future", async () => {
    // One small record, copies of it under 20 other names, and day folders dated in the future (the
    // listing reads the 5 newest days) holding more copies.
    const id = `${stamp}T100000-copy0000`;
    await s3.store.put(keys.captureRecord("emoji", id), JSON.stringify(record(id)));
    for (let d = 1; d <= 5; d++) await s3.store.put(`captures/emoji/images/2099-01-0${d}/20990101T100000-copy0000.json`, JSON.stringify(record(id)));
    for (let i = 0; i < 20; i++)
      await s3.store.put(`captures/emoji/images/${day}/${stamp}T100001-copy${String(i).padStart(4, "0")}.json`, JSON.stringify(record(id)));
    const { captures } = await listing();
    expect(captures.filter((c) => c.id === id).length).toBe(1);
  });
  it("finds today's captures behind 1 000 junk folders sorted before the days, and ignores days past the retention window", async () => {
    const id = `${stamp}T110000-real0000`;
    await s3.store.put(keys.captureRecord("emoji", id), JSON.stringify(record(id)));
    // Junk keys under images/ that sort before "2…": one page of a folder listing holds nothing else.
    for (let i = 0; i < 1000; i += 100)
      await Promise.all(Array.from({ length: 100 }, (_, j) => s3.store.put(`captures/emoji/images/0${String(i + j).padStart(4, "0")}/x`, "x")));
    // A record dated long before the retention window (the bucket would have expired it).
    const old = "20000101T000000-old00000";
    await s3.store.put(
      `captures/emoji/images/2000-01-01/${old}.json`,
      JSON.stringify({
        ...record(old),
        capturedAt: "2000-01-01T00:00:00.000Z",
        image: { ...record(old).image, key: keys.captureFile("emoji", "2000-01-01", old, "png") },
      }),
    );
    const { captures } = await listing();
    expect(captures.map((c) => c.id)).toContain(id);
    expect(captures.map((c) => c.id)).not.toContain(old);
  });
});

describe("the rest of captures/, forged with the edge's key", () => {
  it("a monitoring summary of megabytes is not read (the console's Monitor page gets an error, the isolate keeps its memory)", async () => {
    const labels = Object.fromEntries(Array.from({ length: 200_000 }, (_, i) => [`label-${i}`, 1]));
    const day = { day: "2026-12-01", versions: [], ...noCounts(), requests: 1, labels, drift: [] };
    const summary = JSON.stringify({ schemaVersion: 1, model: "emoji", writtenAt: new Date().toISOString(), threshold: 0.5, reference: null, days: [day] });
    expect(summary.length).toBeGreaterThan(2 * 1024 * 1024);
    await s3.store.put(keys.captureMonitor("emoji"), summary);
    const res = await fetch(`${edge.url}/v1/models/emoji/monitor`, { headers: operator() });
    expect(res.status).toBe(422);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("stored_file_too_large");
  });
});

describe("what a caller learns without an operator key", () => {
  it("/healthz: liveness only without a key or with a client key; models and versions for an operator key", async () => {
    expect((await postClassify(edge, "emoji", images[0] as (typeof images)[number])).status).toBe(200);
    for (const headers of [{}, client()]) {
      const res = await fetch(`${edge.url}/healthz`, { headers });
      expect(res.status).toBe(200);
      expect(await res.json()).toEqual({ status: "ok" });
    }
    const full = (await (await fetch(`${edge.url}/healthz`, { headers: operator() })).json()) as { models: { name: string; version: string }[] };
    expect(full.models.map((m) => m.name)).toEqual(["emoji"]);
  });

  it("GET /v1/models/{name}: a client key reads what it needs to classify, not the metrics; an operator key reads all", async () => {
    const asClient = (await (await fetch(`${edge.url}/v1/models/emoji`, { headers: client() })).json()) as Record<string, unknown>;
    expect(Object.keys(asClient).sort()).toEqual(["input", "labels", "model", "version"]);
    const asOperator = (await (await fetch(`${edge.url}/v1/models/emoji`, { headers: operator() })).json()) as { metrics: { perClass: object } };
    expect(Object.keys(asOperator.metrics.perClass).sort()).toEqual(["animals", "food", "travel"]);
  });
});
