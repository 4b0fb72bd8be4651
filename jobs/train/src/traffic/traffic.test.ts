import { createHmac } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import sharp from "sharp";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { writePointer } from "#shared/artifacts.ts";
import { type CaptureRecord, type Counters, decisionMessage } from "#shared/contracts/capture.ts";
import { validMetadata } from "#shared/contracts/fixtures.ts";
import { sha256Hex } from "#shared/hash.ts";
import { captureDayOf, isCaptureKey, keys } from "#shared/keys.ts";
import { driftOf, MIN_REQUESTS, monitorSummarySchema, referenceOf } from "#shared/monitor.ts";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import { barePng, pngChunk, pngWithChunk, withTrailer } from "../../../../test/support/crafted-images.ts";
import { aroundWrites } from "../../../../test/support/store.ts";
import { memoryLogger } from "../log.ts";
import { ReadBudget } from "./budget.ts";
import { saveCaptureImages } from "./review.ts";
import { applyDecisions, listCaptures, modelsWithTraffic, monitor, processTraffic, reviewNow, writeCaptureConfig } from "./traffic.ts";

/** The job's half of the traffic loop against the local S3 server; the whole loop is in test/traffic.test.ts. */
let s3: LocalS3;
/** A PNG as the edge stores captures: IHDR, IDAT, IEND only. */
const png = async (color: string) =>
  barePng(
    new Uint8Array(
      await sharp({ create: { width: 20, height: 20, channels: 3, background: color } })
        .png()
        .toBuffer(),
    ),
  );

beforeAll(async () => {
  s3 = await startLocalS3();
});
afterAll(async () => {
  await s3?.stop();
});

/** Every object of the test bucket deleted (each test sets up its own). */
async function emptyBucket() {
  const all: string[] = [];
  for await (const o of s3.store.list("")) all.push(o.key);
  if (all.length) await s3.store.delete(all);
}

let n = 0;
/** A served model `pets` trained on dataset `dataset` (layout as given), and one capture of it. */
async function setup(dataset: string, layout: "flat" | "split") {
  const metadata = { ...validMetadata(), dataset: { ...validMetadata().dataset, name: dataset } };
  const bytes = new TextEncoder().encode(JSON.stringify(metadata));
  await s3.store.put(keys.metadata("pets", metadata.version), bytes);
  await writePointer(s3.store, "pets", {
    version: metadata.version,
    metadataSha256: await sha256Hex(bytes),
    promotedAt: new Date().toISOString(),
    previous: null,
    reason: "test",
  });
  for (const label of ["cat", "dog"]) await s3.store.put(`${keys.dataset(dataset)}${layout === "split" ? "train/" : ""}${label}/a.png`, await png("#888"));
}

async function capture(image: Uint8Array, day = new Date().toISOString().slice(0, 10)): Promise<CaptureRecord> {
  const id = `${day.replaceAll("-", "")}T101500-abcd${String(n++).padStart(8, "0")}`;
  const record: CaptureRecord = {
    schemaVersion: 1,
    id,
    model: "pets",
    version: "v0123456789ab",
    capturedAt: `${day}T10:15:00.000Z`,
    reason: "low_confidence",
    predictions: [
      { label: "cat", score: 0.4 },
      { label: "dog", score: 0.35 },
    ],
    image: { key: keys.captureFile("pets", day, id, "png"), contentType: "image/png", bytes: image.length, width: 20, height: 20, resized: false },
  };
  await s3.store.put(record.image.key, image);
  await s3.store.put(keys.captureFile("pets", day, id, "json"), JSON.stringify(record));
  return record;
}

describe("review", () => {
  beforeEach(async () => {
    await emptyBucket();
  });

  it("accepts into the served version's dataset with provenance, discards, and empties the queue", async () => {
    await setup("pets-data", "flat");
    const a = await capture(await png("#f00"));
    const b = await capture(await png("#0f0"));
    const r = await reviewNow(s3.store, "pets", { unseen: true, accept: [a.id], discard: [b.id], as: "dog" }, memoryLogger());
    expect(r.accepted).toEqual([{ id: a.id, key: `datasets/pets-data/dog/captured-${a.id}.png` }]);
    expect(r.discarded).toEqual([b.id]);
    const head = await s3.store.head(`datasets/pets-data/dog/captured-${a.id}.png`);
    expect(head?.metadata).toMatchObject({ "edgetune-captured-from": "pets@v0123456789ab", "edgetune-predicted": "cat:0.4000" });
    expect(await listCaptures(s3.store, "pets")).toEqual([]);
    expect(await s3.store.get(b.image.key)).toBeNull();
  });

  it("puts accepted images under train/ in a dataset with splits, the predicted label by default", async () => {
    await setup("split-data", "split");
    const a = await capture(await png("#00f"));
    const r = await reviewNow(s3.store, "pets", { unseen: true, accept: [a.id] }, memoryLogger());
    expect(r.accepted[0]?.key).toBe(`datasets/split-data/train/cat/captured-${a.id}.png`);
  });

  it("refuses a label the dataset does not have and an image the job cannot decode, keeping both for another decision", async () => {
    await setup("pets-data", "flat");
    const a = await capture(await png("#f0f"));
    const b = await capture(new TextEncoder().encode("not an image at all"));
    await expect(reviewNow(s3.store, "pets", { unseen: true, accept: [a.id], as: "hamster" }, memoryLogger())).rejects.toThrow(
      /Invalid --as "hamster"\. Valid values: cat, dog/,
    );
    const r = await reviewNow(s3.store, "pets", { unseen: true, accept: [b.id], as: "cat" }, memoryLogger());
    expect(r.accepted).toEqual([]);
    expect(r.refused.map((x) => x.id)).toEqual([b.id]);
    // Back in the queue, undecided, with the reason; the other one was never decided.
    const queue = await listCaptures(s3.store, "pets");
    expect(queue.map((c) => [c.id, c.decision, Boolean(c.refused)])).toEqual([
      [a.id, null, false],
      [b.id, null, true],
    ]);
    let added = 0;
    for await (const o of s3.store.list("datasets/")) if (o.key.includes("captured-")) added++;
    expect(added).toBe(0);
  });

  it("ignores a record crafted to point at another object: nothing is copied or deleted", async () => {
    await setup("pets-data", "flat");
    const real = await capture(await png("#123"));
    const forged = { ...real, id: real.id.replace(/.{4}$/, "9999"), image: { ...real.image, key: "datasets/pets-data/cat/a.png" } };
    await s3.store.put(keys.captureRecord("pets", forged.id), JSON.stringify(forged));
    await s3.store.put(
      keys.captureDecision("pets", forged.id),
      JSON.stringify({ schemaVersion: 1, id: forged.id, action: "discard", decidedAt: new Date().toISOString(), by: "console" }),
    );
    expect((await listCaptures(s3.store, "pets")).map((c) => c.id)).toEqual([real.id]);
    const r = await applyDecisions(s3.store, "pets", memoryLogger(), { operatorKeys: ["operator-1"] });
    expect(r).toEqual({ accepted: [], discarded: [], refused: [], unverified: [], replayed: [] });
    await expect(reviewNow(s3.store, "pets", { discard: [forged.id] }, memoryLogger())).rejects.toThrow(/no capture/);
    expect(await s3.store.head("datasets/pets-data/cat/a.png")).not.toBeNull();
  });

  it("applies a stored decision only when an operator's key signed it and the image is the one reviewed", async () => {
    await setup("pets-data", "flat");
    const images = { forged: await png("#0ff"), signed: await png("#ff0"), swapped: await png("#f0f"), moved: await png("#0f0") };
    const [forged, signed, swapped, moved] = [
      await capture(images.forged),
      await capture(images.signed),
      await capture(images.swapped),
      await capture(images.moved),
    ] as CaptureRecord[];
    const decidedAt = new Date().toISOString();
    const sign = (key: string, d: { id: string; label: string; imageSha256: string }) =>
      createHmac("sha256", key)
        .update(decisionMessage("pets", { ...d, action: "accept", decidedAt }))
        .digest("hex");
    const put = async (c: CaptureRecord, bytes: Uint8Array, key: string, label = "cat", signedLabel = label) => {
      const imageSha256 = await sha256Hex(bytes);
      const signature = sign(key, { id: c.id, label: signedLabel, imageSha256 });
      const decision = { schemaVersion: 1, id: c.id, action: "accept", label, decidedAt, by: "console", imageSha256, signature };
      await s3.store.put(keys.captureDecision("pets", c.id), JSON.stringify(decision));
    };
    // Written with S3 access alone: a guessed key; a signature moved to another label.
    await put(forged as CaptureRecord, images.forged, "guess");
    await put(moved as CaptureRecord, images.moved, "operator-1", "dog", "cat");
    // Signed by an operator; and signed, but the image was replaced after the review.
    await put(signed as CaptureRecord, images.signed, "operator-1");
    await put(swapped as CaptureRecord, images.swapped, "operator-1");
    await s3.store.put(swapped?.image.key as string, await png("#000"));
    const r = await applyDecisions(s3.store, "pets", memoryLogger(), { operatorKeys: ["operator-0", "operator-1"] });
    expect(r.accepted.map((a) => a.id)).toEqual([signed?.id]);
    expect(r.unverified.sort()).toEqual([forged?.id, moved?.id].sort());
    expect(r.refused).toEqual([{ id: swapped?.id, reason: expect.stringContaining("changed after it was reviewed") }]);
    // The ones not applied are back in the queue, undecided, saying why.
    const queue = await listCaptures(s3.store, "pets");
    expect(queue.map((c) => [c.id, c.decision, Boolean(c.refused)]).sort()).toEqual(
      [
        [forged?.id, null, true],
        [moved?.id, null, true],
        [swapped?.id, null, true],
      ].sort(),
    );
    // A replay with the edge's credentials after the operator deleted what the decision added: the signed
    // decision, its record and its image written back under captures/. The applied-marker (outside
    // captures/) says it was applied: nothing is added again.
    const added = `datasets/pets-data/cat/captured-${signed?.id}.png`;
    expect(await s3.store.head(added)).not.toBeNull();
    await s3.store.delete([added]);
    await s3.store.put(signed?.image.key as string, images.signed);
    await s3.store.put(keys.captureRecord("pets", signed?.id as string), JSON.stringify(signed));
    await put(signed as CaptureRecord, images.signed, "operator-1");
    const replay = await applyDecisions(s3.store, "pets", memoryLogger(), { operatorKeys: ["operator-1"] });
    expect([replay.accepted, replay.replayed]).toEqual([[], [signed?.id]]);
    expect(await s3.store.head(added)).toBeNull();
    // The marker is where the edge cannot write (its key is outside captures/), and out of the dataset's listing.
    expect(await s3.store.head(keys.capturedApplied("pets-data", "pets", signed?.id as string))).not.toBeNull();
    expect(isCaptureKey(keys.capturedApplied("pets-data", "pets", signed?.id as string))).toBe(false);
  });

  it("goes on past a malformed decision file (anyone who may write captures/ could leave one)", async () => {
    await setup("pets-data", "flat");
    const junk = await capture(await png("#321"));
    const good = await capture(await png("#123"));
    await s3.store.put(keys.captureDecision("pets", junk.id), "{ not json");
    const r = await reviewNow(s3.store, "pets", { discard: [good.id] }, memoryLogger());
    expect(r.discarded).toEqual([good.id]);
    expect((await listCaptures(s3.store, "pets")).map((c) => [c.id, c.decision])).toEqual([[junk.id, null]]);
  });

  it("refuses to decide on a capture that does not exist, and capture settings for a model that is not served", async () => {
    await setup("pets-data", "flat");
    await expect(reviewNow(s3.store, "pets", { discard: ["20261129T101500-zzzzzzzz"] }, memoryLogger())).rejects.toThrow(/no capture 20261129T101500-zzzzzzzz/);
    await expect(writeCaptureConfig(s3.store, "nope", { enabled: true })).rejects.toThrow(/no served version/);
    await expect(writeCaptureConfig(s3.store, "pets", { belowConfidence: 3 })).rejects.toThrow(/belowConfidence/);
  });
});

describe("the rest of captures/, forged with the edge's key", () => {
  it("the nightly job visits only models the job made, and never downloads an oversized record or decision", async () => {
    await setup("forged-pets", "flat");
    const real = await capture(await png("#123"));
    // Folders for models that do not exist: no work at night.
    await s3.store.put(keys.captureCounterFile("ghost", "2026-11-29", "s1"), "{}");
    expect(await modelsWithTraffic(s3.store)).toContain("pets");
    expect(await modelsWithTraffic(s3.store)).not.toContain("ghost");
    // A record valid in every field but 100 KB long (a label of 100 KB), and a decision as large.
    const big = { ...real, id: real.id.replace(/.{4}$/, "ffff"), predictions: [{ label: "x".repeat(100_000), score: 0.4 }] };
    big.image = { ...real.image, key: keys.captureFile("pets", captureDayOf(big.id), big.id, "png") };
    await s3.store.put(keys.captureRecord("pets", big.id), JSON.stringify(big));
    await s3.store.put(
      keys.captureDecision("pets", real.id),
      JSON.stringify({ id: real.id, action: "discard", decidedAt: new Date().toISOString(), by: "cli", pad: "x".repeat(100_000) }),
    );
    const listed = await listCaptures(s3.store, "pets");
    expect(listed.map((c) => c.id)).toContain(real.id);
    expect(listed.map((c) => c.id)).not.toContain(big.id);
    expect(listed.find((c) => c.id === real.id)?.decision).toBeNull();
  });
});

describe("one night's reading of captures/ is bounded, valid files or not", () => {
  it("a flood of ten-byte files under decisions/ and counters/ costs a night at most its budget, and is deleted as it is read", async () => {
    await emptyBucket();
    await setup("pets-data", "flat");
    const today = new Date().toISOString().slice(0, 10);
    const junk = [
      ...Array.from({ length: 600 }, (_, i) => keys.captureDecision("pets", `20000101T000000-junk${String(i).padStart(8, "0")}`)),
      ...Array.from({ length: 600 }, (_, i) => keys.captureCounterFile("pets", today, `junk${i}`)),
    ];
    for (let i = 0; i < junk.length; i += 100) await Promise.all(junk.slice(i, i + 100).map((k) => s3.store.put(k, "0123456789")));
    let gets = 0;
    const counted = Object.create(s3.store, {
      get: {
        value: (key: string, options?: { maxBytes?: number }) => {
          gets++;
          return s3.store.get(key, options);
        },
      },
    }) as typeof s3.store;
    const left = async () => {
      let n = 0;
      for await (const o of s3.store.list(keys.captures("pets"))) if (o.key.includes("junk")) n++;
      return n;
    };
    const nights: number[] = [];
    for (let night = 0; night < 10 && (await left()) > 0; night++) {
      gets = 0;
      const log = memoryLogger();
      await processTraffic(counted, log, [], new ReadBudget({ requests: 400, bytes: 1024 * 1024, milliseconds: 60_000 }));
      nights.push(gets);
      expect(gets).toBeLessThanOrEqual(400);
    }
    // Each night read at most its budget and deleted what it read: the flood is gone after a few nights.
    expect(await left()).toBe(0);
    expect(nights.length).toBeGreaterThan(2);
    expect(nights.length).toBeLessThan(10);
  });

  it("a capture record names at most 5 predictions and is at most 16 KB", async () => {
    await setup("pets-data", "flat");
    const c = await capture(await png("#1f1"));
    const six = { ...c, predictions: Array.from({ length: 6 }, (_, i) => ({ label: "cat", score: i / 10 })) };
    await s3.store.put(keys.captureRecord("pets", c.id), JSON.stringify(six));
    expect((await listCaptures(s3.store, "pets")).map((x) => x.id)).not.toContain(c.id);
    const padded = { ...c, refused: { reason: "x".repeat(20 * 1024), at: new Date().toISOString() } };
    await s3.store.put(keys.captureRecord("pets", c.id), JSON.stringify(padded));
    expect((await listCaptures(s3.store, "pets")).map((x) => x.id)).not.toContain(c.id);
    await s3.store.put(keys.captureRecord("pets", c.id), JSON.stringify(c));
    expect((await listCaptures(s3.store, "pets")).map((x) => x.id)).toContain(c.id);
  });
});

/**
 * The store with an attacker who replaces each file whose key matches with `bytes` after it was listed
 * (or HEADed), just before it is read; `held` sums the bytes every read returned.
 */
function swappedBeforeRead(match: (key: string) => boolean, bytes: Uint8Array) {
  const held = { bytes: 0 };
  const store = Object.create(s3.store, {
    get: {
      value: async (key: string, options?: { maxBytes?: number }) => {
        if (match(key)) await s3.store.put(key, bytes);
        const got = await s3.store.get(key, options);
        held.bytes += got?.length ?? 0;
        return got;
      },
    },
  }) as typeof s3.store;
  return { store, held };
}

describe("sizes are checked while reading, not only before (the edge's key may replace a file after it was listed)", () => {
  beforeEach(async () => {
    await emptyBucket();
    await setup("pets-data", "flat");
  });
  const fiveMb = new Uint8Array(5 * 1024 * 1024).fill(0x20);

  it("records, decisions and images replaced by 5 MB between listing and reading are refused, not held", async () => {
    const c = await capture(await png("#5a5"));
    await s3.store.put(keys.captureDecision("pets", c.id), JSON.stringify({ id: c.id, action: "discard", decidedAt: new Date().toISOString(), by: "cli" }));
    const listing = swappedBeforeRead((k) => k.endsWith(".json"), fiveMb);
    expect(await listCaptures(listing.store, "pets")).toEqual([]);
    expect(listing.held.bytes).toBeLessThan(200 * 1024);
    // The CLI's own read of a record it is told to decide on.
    const other = await capture(await png("#a5a"));
    const record = swappedBeforeRead((k) => k === keys.captureRecord("pets", other.id), fiveMb);
    await expect(reviewNow(record.store, "pets", { discard: [other.id] }, memoryLogger())).rejects.toThrow(/has no capture/);
    expect(record.held.bytes).toBeLessThan(200 * 1024);
  });
});

/** The store as the CLI uses it, with an attacker holding the edge's credentials (anything under captures/) acting the moment a decision file is written, before it is applied. */
const attackedWhenDecided = (attack: (decisionKey: string) => Promise<void>) =>
  aroundWrites(s3.store, { after: async (key) => (key.includes("/decisions/") ? attack(key) : undefined) });

describe("review decisions cannot be turned (the edge's credentials against the CLI)", () => {
  beforeEach(async () => {
    await emptyBucket();
    await setup("pets-data", "flat");
  });
  const capturedFiles = async () => {
    const out: string[] = [];
    for await (const o of s3.store.list("datasets/pets-data/")) if (o.key.includes("/captured-") && !o.key.includes("/.edgetune/")) out.push(o.key);
    return out;
  };

  it("a discard stays a discard when its decision file is rewritten as an accept before it is applied (5 of 5)", async () => {
    for (let attempt = 0; attempt < 5; attempt++) {
      const c = await capture(await png(`#${attempt}${attempt}0`));
      const store = attackedWhenDecided(async (key) => {
        await s3.store.put(key, JSON.stringify({ schemaVersion: 1, id: c.id, action: "accept", label: "cat", decidedAt: new Date().toISOString(), by: "cli" }));
      });
      const r = await reviewNow(store, "pets", { discard: [c.id] }, memoryLogger());
      expect([r.discarded, r.accepted]).toEqual([[c.id], []]);
    }
    expect(await capturedFiles()).toEqual([]);
    expect(await listCaptures(s3.store, "pets")).toEqual([]);
  });

  it("a decision file the edge wrote first neither blocks the operator's decision nor replaces it", async () => {
    const c = await capture(await png("#0d0"));
    const forged = { schemaVersion: 1, id: c.id, action: "accept", label: "cat", decidedAt: new Date().toISOString(), by: "cli" };
    await s3.store.put(keys.captureDecision("pets", c.id), JSON.stringify(forged));
    const log = memoryLogger();
    const r = await reviewNow(s3.store, "pets", { discard: [c.id] }, log);
    expect([r.discarded, r.accepted]).toEqual([[c.id], []]);
    expect(log.lines.some((l) => l.message.includes("already had a recorded decision"))).toBe(true);
    expect(await capturedFiles()).toEqual([]);
    expect(await s3.store.get(keys.captureDecision("pets", c.id))).toBeNull();
  });

  it("an accept adds exactly the bytes whose hash it bound, under its own label, whatever is swapped in after", async () => {
    const shown = await png("#0a0");
    const c = await capture(shown);
    const store = attackedWhenDecided(async (key) => {
      await s3.store.put(c.image.key, await png("#a00"));
      await s3.store.put(key, JSON.stringify({ schemaVersion: 1, id: c.id, action: "accept", label: "cat", decidedAt: new Date().toISOString(), by: "cli" }));
    });
    const r = await reviewNow(store, "pets", { unseen: true, accept: [c.id], as: "dog" }, memoryLogger());
    expect(r.accepted).toEqual([{ id: c.id, key: `datasets/pets-data/dog/captured-${c.id}.png` }]);
    expect(await capturedFiles()).toEqual([`datasets/pets-data/dog/captured-${c.id}.png`]);
    const added = (await s3.store.get(`datasets/pets-data/dog/captured-${c.id}.png`)) as Uint8Array;
    expect(await sha256Hex(added)).toBe(await sha256Hex(shown));
  });

  it("--save names each image by its hash; --accept <id>@<hash> adds those bytes, or nothing once they changed", async () => {
    const [kept, swapped] = [await capture(await png("#0c0")), await capture(await png("#c00"))];
    const dir = await mkdtemp(join(tmpdir(), "edgetune-review-"));
    const saved = await saveCaptureImages(s3.store, "pets", dir);
    const ref = (id: string) => basename(saved.find((f) => f.id === id)?.file as string).replace(/\.png$/, "");
    expect(ref(kept.id)).toBe(`${kept.id}@${await sha256Hex(await png("#0c0"))}`);
    await s3.store.put(swapped.image.key, await png("#00c")); // after the operator looked at it
    const r = await reviewNow(s3.store, "pets", { accept: [ref(kept.id), ref(swapped.id)], as: "dog" }, memoryLogger());
    expect(r.accepted.map((a) => a.id)).toEqual([kept.id]);
    expect(r.refused).toEqual([{ id: swapped.id, reason: expect.stringContaining("is not the one saved as") }]);
    expect(await capturedFiles()).toEqual([`datasets/pets-data/dog/captured-${kept.id}.png`]);
    await rm(dir, { recursive: true });
  });

  it("an accept whose image could not be written is added by the next apply, not reported as replayed and lost", async () => {
    const c = await capture(await png("#0e0"));
    const added = `datasets/pets-data/dog/captured-${c.id}.png`;
    // The dataset write fails once (S3 down, or the CLI stopped at that moment).
    const failing = aroundWrites(s3.store, {
      before: async (key) => {
        if (key === added) throw new Error("connection reset");
      },
    });
    const first = await reviewNow(failing, "pets", { unseen: true, accept: [c.id], as: "dog" }, memoryLogger());
    expect(first.refused.map((r) => r.id)).toEqual([c.id]);
    expect(await s3.store.head(added)).toBeNull();
    const again = await reviewNow(s3.store, "pets", { unseen: true, accept: [c.id], as: "dog" }, memoryLogger());
    expect([again.accepted.map((a) => a.id), again.replayed]).toEqual([[c.id], []]);
    expect(await s3.store.head(added)).not.toBeNull();
  });

  it("adds only a PNG as the edge encodes it: a file written straight to captures/ with text in a chunk or after IEND is refused", async () => {
    const secret = new TextEncoder().encode("GPS 48.85,2.35");
    const plain = await png("#0f1");
    const forged = [pngWithChunk(plain, pngChunk("tEXt", secret)), pngWithChunk(plain, pngChunk("eXIf", secret)), withTrailer(plain, "GPS 48.85,2.35")];
    const ids: string[] = [];
    for (const bytes of forged) ids.push((await capture(bytes)).id);
    const r = await reviewNow(s3.store, "pets", { unseen: true, accept: ids, as: "dog" }, memoryLogger());
    expect(r.accepted).toEqual([]);
    expect(r.refused.map((x) => [x.id, x.reason])).toEqual(ids.map((id) => [id, expect.stringContaining("not a plain PNG")]));
    expect(await capturedFiles()).toEqual([]);
    const clean = await capture(plain);
    expect((await reviewNow(s3.store, "pets", { unseen: true, accept: [clean.id], as: "dog" }, memoryLogger())).accepted.map((a) => a.id)).toEqual([clean.id]);
  });

  it("an accept binds the whole sha256 of an image the operator saved, or says --unseen", async () => {
    const c = await capture(await png("#0c1"));
    // Without a pin, and without saying it adds bytes nobody looked at: refused before anything is written.
    await expect(reviewNow(s3.store, "pets", { accept: [c.id], as: "dog" }, memoryLogger())).rejects.toThrow(/--unseen/);
    const sha = await sha256Hex(await png("#0c1"));
    // A prefix of the hash (8 or 12 digits, as before) is not a pin: other bytes can be made to match it.
    for (const short of [sha.slice(0, 8), sha.slice(0, 12)])
      await expect(reviewNow(s3.store, "pets", { accept: [`${c.id}@${short}`], as: "dog" }, memoryLogger())).rejects.toThrow(/64 hex/);
    expect(await capturedFiles()).toEqual([]);
    expect((await listCaptures(s3.store, "pets")).map((x) => [x.id, x.decision])).toEqual([[c.id, null]]);
    const r = await reviewNow(s3.store, "pets", { accept: [`${c.id}@${sha}`], as: "dog" }, memoryLogger());
    expect(r.accepted.map((a) => a.id)).toEqual([c.id]);
  });

  it("a stored label cannot start a line of its own in what the operator reads", async () => {
    const c = await capture(await png("#00b"));
    await s3.store.put(keys.captureRecord("pets", c.id), JSON.stringify({ ...c, predictions: [{ label: "x\n3 added to the dataset", score: 0.9 }] }));
    const r = await reviewNow(s3.store, "pets", { unseen: true, accept: [c.id] }, memoryLogger());
    expect(r.refused).toEqual([{ id: c.id, reason: expect.stringContaining('its predicted label "x\\x0a3 added to the dataset"') }]);
    expect(r.refused[0]?.reason).not.toContain("\n");
  });

  it("skips records and decisions larger than any the edge writes, unread", async () => {
    const big = await capture(await png("#0b0"));
    const pad = " ".repeat(70 * 1024);
    await s3.store.put(keys.captureRecord("pets", big.id), `${JSON.stringify(big)}${pad}`);
    const small = await capture(await png("#b00"));
    const decision = { schemaVersion: 1, id: small.id, action: "discard", decidedAt: new Date().toISOString(), by: "console" };
    await s3.store.put(keys.captureDecision("pets", small.id), `${JSON.stringify(decision)}${pad.slice(0, 5000)}`);
    expect((await listCaptures(s3.store, "pets")).map((c) => [c.id, c.decision])).toEqual([[small.id, null]]);
  });

  it("takes the capture's predicted label without --as only if the dataset has it", async () => {
    const c = await capture(await png("#00a"));
    const forged = { ...c, predictions: [{ label: "cat\u001b[2J", score: 0.9 }] };
    await s3.store.put(keys.captureRecord("pets", c.id), JSON.stringify(forged));
    const r = await reviewNow(s3.store, "pets", { unseen: true, accept: [c.id] }, memoryLogger());
    expect(r.refused).toEqual([{ id: c.id, reason: expect.stringContaining("is not a label of dataset pets-data; accept it with --as <label> (cat, dog)") }]);
    expect(await capturedFiles()).toEqual([]);
    // Nothing was decided: it waits in the queue for a decision with --as.
    expect((await listCaptures(s3.store, "pets")).map((x) => [x.id, x.decision])).toEqual([[c.id, null]]);
    await expect(reviewNow(s3.store, "pets", { unseen: true, accept: [c.id], as: "cat\u200b" }, memoryLogger())).rejects.toThrow(/invisible format character/);
  });
});

describe("monitor", () => {
  const delta = (day: string, version: string, requests: number, lowConfidence: number, labels: Record<string, number>): Counters => ({
    schemaVersion: 1,
    model: "pets",
    version,
    from: `${day}T01:00:00.000Z`,
    to: `${day}T01:01:00.000Z`,
    requests,
    labels,
    confidence: [0, 0, 0, 0, lowConfidence, 0, 0, 0, 0, requests - lowConfidence],
    lowConfidence,
    captured: 1,
    overCap: 0,
    busy: 0,
    failed: 0,
    optedOut: 0,
  });

  /** Versions of `pets` with labels cat and dog (the monitor counts only a version's own labels). */
  const versions = async (...list: string[]) => {
    for (const version of list) await s3.store.put(keys.metadata("pets", version), JSON.stringify({ ...validMetadata(), version }));
  };
  const put = (day: string, i: number | string, d: Counters | object) => s3.store.put(keys.captureCounterFile("pets", day, `s${i}`), JSON.stringify(d));
  const counterFiles = async () => {
    const files: string[] = [];
    for await (const o of s3.store.list(keys.captureCounters("pets"))) files.push(o.key.split("/").slice(-2).join("/"));
    return files.sort();
  };
  beforeEach(async () => {
    const old: string[] = [];
    for await (const o of s3.store.list(keys.captureCounters("pets"))) old.push(o.key);
    await s3.store.delete(old);
  });

  it("adds deltas up per day and rolls past days up into one file per version", async () => {
    await versions("v0123456789ab", "v0000000000ff");
    await put("2026-11-20", 1, delta("2026-11-20", "v0123456789ab", 10, 2, { cat: 6, dog: 4 }));
    await put("2026-11-20", 2, delta("2026-11-20", "v0123456789ab", 5, 1, { cat: 5 }));
    await put("2026-11-20", 3, delta("2026-11-20", "v0000000000ff", 3, 0, { dog: 3 }));
    await put("2026-11-22", 1, delta("2026-11-22", "v0123456789ab", 4, 4, { dog: 4 }));
    await put("2026-11-22", 2, delta("2026-11-22", "v0123456789ab", 4, 0, { dog: 4 }));
    const now = new Date("2026-11-22T12:00:00Z");
    const s = await monitor(s3.store, "pets", { rollUp: true, now, days: 7 });
    expect(s.days.map((d) => [d.day, d.requests, d.lowConfidence, d.labels])).toEqual([
      ["2026-11-20", 18, 3, { cat: 11, dog: 7 }],
      ["2026-11-22", 8, 4, { dog: 8 }],
    ]);
    // The 20th is rolled up per version; the 22nd (yesterday or later) keeps its deltas.
    expect(await counterFiles()).toEqual([
      "2026-11-20/rollup-v0000000000ff.json",
      "2026-11-20/rollup-v0123456789ab.json",
      "2026-11-22/s1.json",
      "2026-11-22/s2.json",
    ]);
    // Reading again gives the same sums.
    const again = await monitor(s3.store, "pets", { rollUp: true, now, days: 7 });
    expect(again.days.map((d) => d.requests)).toEqual([18, 8]);
  });

  it("bounds what it reads from counters/ (the edge's key may write there): forged files neither exhaust it nor cost a past day its real counts", async () => {
    await versions("v0123456789ab");
    const day = "2026-11-20";
    for (let i = 0; i < 3; i++) await put(day, i, delta(day, "v0123456789ab", 10, 1, { cat: 7, dog: 3 }));
    // 30 forged deltas of 20 000 labels each (~0.5 MB apiece): skipped by their listed size, never downloaded.
    const many = Object.fromEntries(Array.from({ length: 20_000 }, (_, i) => [`label-${i}`, 1]));
    for (let i = 0; i < 30; i++) await put(day, `big${i}`, { ...delta(day, "v0123456789ab", 1, 0, {}), labels: many });
    // Two schema-valid deltas whose sum is past 2^53; labels the version does not have; a version that does not exist.
    const huge = Number.MAX_SAFE_INTEGER - 1;
    await put(day, "huge1", { ...delta(day, "v0123456789ab", huge, 0, { cat: huge }), confidence: [huge, 0, 0, 0, 0, 0, 0, 0, 0, 0] });
    await put(day, "huge2", { ...delta(day, "v0123456789ab", huge, 0, { cat: huge }), confidence: [huge, 0, 0, 0, 0, 0, 0, 0, 0, 0] });
    await put(day, "labels", delta(day, "v0123456789ab", 5, 0, { "cat\u200b": 5 }));
    await put(day, "version", delta(day, "v0badbadbad00", 5, 0, { cat: 5 }));
    const downloads: string[] = [];
    const store = Object.create(s3.store, {
      get: {
        value: (key: string, options?: { maxBytes?: number }) => {
          downloads.push(key);
          return s3.store.get(key, options);
        },
      },
    }) as typeof s3.store;
    const skipped = { tooLarge: 0, invalid: 0, unknownLabels: 0, overLimit: 0 };
    const now = new Date("2026-11-22T12:00:00Z");
    const s = await monitor(store, "pets", { rollUp: true, now, days: 7, skipped });
    expect(downloads.filter((k) => k.includes("/sbig"))).toEqual([]);
    expect(skipped).toEqual({ tooLarge: 30, invalid: 2, unknownLabels: 2, overLimit: 0 });
    // A readable summary with the real counts only, and the day rolled up from them.
    expect(monitorSummarySchema.parse(JSON.parse(JSON.stringify(s))).days.map((d) => [d.day, d.requests, d.labels])).toEqual([[day, 30, { cat: 21, dog: 9 }]]);
    const files = await counterFiles();
    expect(files).toContain(`${day}/rollup-v0123456789ab.json`);
    expect(files.filter((f) => /\/s\d\.json$/.test(f))).toEqual([]); // the real deltas are in the roll-up
    const again = await monitor(s3.store, "pets", { rollUp: true, now, days: 7 });
    expect(again.days.map((d) => [d.requests, d.labels])).toEqual([[30, { cat: 21, dog: 9 }]]);
  });

  it("a counter file replaced by 5 MB after it was listed is skipped, not read", async () => {
    await versions("v0123456789ab");
    const day = "2026-11-20";
    const file = keys.captureCounterFile("pets", day, "s1");
    await s3.store.put(file, JSON.stringify(delta(day, "v0123456789ab", 10, 1, { cat: 7, dog: 3 })));
    const { store, held } = swappedBeforeRead((k) => k === file, new Uint8Array(5 * 1024 * 1024).fill(0x20));
    const skipped = { tooLarge: 0, invalid: 0, unknownLabels: 0, overLimit: 0 };
    await monitor(store, "pets", { now: new Date("2026-11-22T12:00:00Z"), days: 7, skipped });
    expect(skipped.tooLarge).toBe(1);
    expect(held.bytes).toBeLessThan(300 * 1024);
  });

  it("never lets a sum leave the safe-integer range: roll-ups saturate and stay readable", async () => {
    await versions("v0123456789ab");
    const day = "2026-11-20";
    const huge = Number.MAX_SAFE_INTEGER - 1;
    // A roll-up (which may hold more than a delta) at the edge of the range, and a real delta on top.
    await s3.store.put(keys.captureCounterFile("pets", day, "rollup-v0123456789ab"), JSON.stringify(delta(day, "v0123456789ab", huge, 0, { cat: huge })));
    await put(day, 1, delta(day, "v0123456789ab", 10, 0, { cat: 10 }));
    const now = new Date("2026-11-22T12:00:00Z");
    const s = await monitor(s3.store, "pets", { rollUp: true, now, days: 7 });
    expect(monitorSummarySchema.parse(JSON.parse(JSON.stringify(s))).days[0]?.requests).toBe(Number.MAX_SAFE_INTEGER);
    const rollup = JSON.parse(new TextDecoder().decode((await s3.store.get(keys.captureCounterFile("pets", day, "rollup-v0123456789ab"))) as Uint8Array));
    expect(rollup.requests).toBe(Number.MAX_SAFE_INTEGER);
  });

  it("gives the held-out share under a threshold exactly, from the per-image scores or a bin edge, never interpolated", () => {
    // 6 held-out images, 5 of them in the top bin [0.9, 1]: under 0.99 is not knowable from the bins.
    const metadata = { ...validMetadata(), metrics: { ...validMetadata().metrics, evaluatedOn: 6, confidence: [0, 0, 0, 0, 0, 0, 0, 1, 0, 5] } };
    expect(referenceOf(metadata, null, 0.99).lowConfidence).toBeNull();
    expect(referenceOf(metadata, null, 0.8).lowConfidence).toBeCloseTo(1 / 6); // a bin edge: exact
    const scores = [0.75, 0.93, 0.97, 0.991, 0.995, 0.999];
    expect(referenceOf(metadata, null, 0.99, scores).lowConfidence).toBeCloseTo(3 / 6);
    // Scores that do not match the evaluated count are not trusted.
    expect(referenceOf(metadata, null, 0.99, scores.slice(1)).lowConfidence).toBeNull();
  });

  it("flags a rise of unsure answers and a moved label distribution, given enough answers", () => {
    const metadata = { ...validMetadata(), metrics: { ...validMetadata().metrics, evaluatedOn: 20, confidence: [0, 0, 0, 0, 0, 2, 0, 0, 0, 18] } };
    // Held-out: 10 predicted cat, 10 dog; 10 % under 0.6 (the bin [0.5, 0.6) is wholly under it).
    const reference = referenceOf(
      metadata,
      [
        [9, 1],
        [1, 9],
      ],
      0.6,
    );
    expect(reference.lowConfidence).toBeCloseTo(0.1);
    expect(reference.labels).toEqual({ cat: 0.5, dog: 0.5 });
    const day = (requests: number, low: number, labels: Record<string, number>) => ({
      day: "2026-11-29",
      versions: [],
      requests,
      labels,
      confidence: new Array(10).fill(0),
      lowConfidence: low,
      captured: 0,
      overCap: 0,
      busy: 0,
      failed: 0,
      optedOut: 0,
    });
    expect(driftOf(day(100, 10, { cat: 50, dog: 50 }), reference)).toEqual([]);
    expect(driftOf(day(100, 35, { cat: 50, dog: 50 }), reference)).toEqual(["low-confidence answers 35.0 % (held-out: 10.0 %)"]);
    expect(driftOf(day(100, 10, { cat: 90, dog: 10 }), reference)).toEqual(["label shift: cat is 90.0 % of answers (held-out: 50.0 %)"]);
    expect(driftOf(day(MIN_REQUESTS - 1, MIN_REQUESTS - 1, { cat: MIN_REQUESTS - 1 }), reference)).toEqual([]);
  });
});
