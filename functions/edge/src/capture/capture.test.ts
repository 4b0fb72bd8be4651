import { afterEach, describe, expect, it, vi } from "vitest";
import { captureRecordSchema, countersSchema } from "#shared/contracts/capture.ts";
import { isCaptureKey, keys } from "#shared/keys.ts";
import { createAdmission } from "../http/admission.ts";
import type { ModelSource } from "../model/source.ts";
import { Capturer, type Observation } from "./capture.ts";
import { type CaptureStore, createCaptureStore } from "./store.ts";

/**
 * The capture logic with its two boundaries faked: the bucket (a map with S3's conditional-write rules)
 * and the settings source. The worker in workerd against the local S3 server is tested in
 * test/traffic.test.ts.
 */
function fakeBucket(options: { failPuts?: boolean } = {}) {
  const objects = new Map<string, { body: Uint8Array | string; etag: string }>();
  let n = 0;
  const store: CaptureStore & { objects: typeof objects } = {
    objects,
    async put(key, body, _type, condition = {}) {
      await Promise.resolve();
      if (options.failPuts) throw new Error("connection reset");
      const current = objects.get(key);
      if (condition.ifNoneMatch === "*" && current) return false;
      if (condition.ifMatch && current?.etag !== condition.ifMatch) return false;
      objects.set(key, { body, etag: `"${++n}"` });
      return true;
    },
    async get(key) {
      await Promise.resolve();
      const o = objects.get(key);
      if (!o) return null;
      return { bytes: typeof o.body === "string" ? new TextEncoder().encode(o.body) : o.body, etag: o.etag, contentType: "application/json" };
    },
    async list(prefix, limit) {
      return [...objects.keys()]
        .filter((k) => k.startsWith(prefix))
        .sort()
        .slice(0, limit);
    },
    async listFolders(prefix) {
      return [...new Set([...objects.keys()].filter((k) => k.startsWith(prefix)).map((k) => `${prefix}${k.slice(prefix.length).split("/")[0]}/`))];
    },
  };
  return store;
}

function settings(config: object | null): ModelSource & { reads: number } {
  const source = {
    reads: 0,
    async getIfChanged(key: string) {
      source.reads++;
      expect(key).toBe(keys.captureConfig("pets"));
      return config ? { status: 200 as const, bytes: new TextEncoder().encode(JSON.stringify(config)), etag: '"c"' } : { status: 404 as const };
    },
    async get() {
      return null;
    },
    async *listFolders() {},
  };
  return source;
}

const capturer = (source: ModelSource, store: CaptureStore | null, extra: Partial<ConstructorParameters<typeof Capturer>[2]> = {}) =>
  new Capturer(source, store, {
    ttlMs: 60_000,
    flushMs: 60_000,
    encodePng: async (p) => new Uint8Array(p.width * p.height),
    exclusive: (work) => work(),
    idle: () => true,
    log: () => {},
    random: () => 0.99,
    ...extra,
  });

/** One answered request, and what it left to run after the answer. */
const observe = async (c: Capturer, o: Observation) => {
  await (c.observe(o) ?? Promise.resolve());
};
/** A fresh isolate captures nothing until its first settings read has answered: this is that first answer. */
const warm = async (c: Capturer, model = "pets") => observe(c, observation(0.99, { model }));

function observation(top: number, extra: Partial<Observation> = {}): Observation {
  return {
    model: "pets",
    version: "v0123456789ab",
    labels: ["cat", "dog"],
    scores: new Float32Array([top, 1 - top]),
    unsure: undefined,
    pixels: { data: new Uint8Array(40 * 30 * 3), width: 40, height: 30, channels: 3 },
    optOut: false,
    ...extra,
  };
}

const records = (store: ReturnType<typeof fakeBucket>) =>
  [...store.objects.entries()]
    .filter(([k]) => k.includes("/images/") && k.endsWith(".json"))
    .map(([, o]) => captureRecordSchema.parse(JSON.parse(o.body as string)));

afterEach(() => vi.unstubAllGlobals());

describe("Capturer", () => {
  it("stores nothing while capture is off (no capture.json), but counts", async () => {
    const store = fakeBucket();
    const c = capturer(settings(null), store, { flushMs: 0 });
    await observe(c, observation(0.45, { labels: ["cat", "dog", "fox"], scores: new Float32Array([0.45, 0.3, 0.25]) }));
    expect(records(store)).toEqual([]);
    const counters = [...store.objects.entries()].filter(([k]) => k.includes("/counters/"));
    expect(counters.length).toBe(1);
    const delta = countersSchema.parse(JSON.parse(counters[0]?.[1].body as string));
    expect(delta).toMatchObject({ requests: 1, labels: { cat: 1 }, lowConfidence: 1, captured: 0 });
    expect(delta.confidence[4]).toBe(1);
  });

  it("stores an unsure answer with its record (image first), a PNG encoded from its pixels", async () => {
    const store = fakeBucket();
    const c = capturer(settings({ enabled: true, belowConfidence: 0.6 }), store);
    await warm(c);
    await observe(c, observation(0.55));
    await observe(c, observation(0.9)); // sure, and not sampled (random 0.99 ≥ 0)
    const [r] = records(store);
    expect(records(store).length).toBe(1);
    expect(r).toMatchObject({ reason: "low_confidence", version: "v0123456789ab", image: { contentType: "image/png", resized: false, width: 40 } });
    expect(r?.predictions[0]).toMatchObject({ label: "cat" });
    // The fake encoder's output (one byte per pixel): what is stored came from the encoder, not the client.
    expect(store.objects.get(r?.image.key as string)?.body).toEqual(new Uint8Array(40 * 30));
    expect(c.stats()).toMatchObject({ captured: 1, failed: 0 });
    for (const k of store.objects.keys()) expect(isCaptureKey(k)).toBe(true);
  });

  it("with no number set, stores what the version answers unsure, whatever the score; a set number keeps its meaning", async () => {
    // A top score of 0.45 (two labels would make the other one the top).
    const low = (unsure: boolean | undefined) => observation(0.45, { labels: ["cat", "dog", "fox"], scores: new Float32Array([0.45, 0.3, 0.25]), unsure });
    const store = fakeBucket();
    // No belowConfidence (as `edgetune capture --on` writes it now): classify's own "unsure" decides.
    const c = capturer(settings({ enabled: true }), store, { flushMs: 0 });
    await warm(c);
    await observe(c, observation(0.9, { unsure: true })); // above 0.5, below its label's threshold
    await observe(c, observation(0.3, { unsure: false, scores: new Float32Array([0.3, 0.25, 0.45]), labels: ["cat", "dog", "_none"] })); // none of these: not unsure
    await observe(c, low(undefined)); // a version trained before thresholds: the old 0.5 rule
    await observe(c, observation(0.7)); // … and above it
    expect(records(store).map((r) => r.predictions[0]?.score.toFixed(2))).toEqual(["0.90", "0.45"]);
    // The monitor's low-confidence count stays on a number (0.5 when none is set; its held-out reference
    // needs one): the none-of-these answer at 0.45 and the 0.45 one.
    const deltas = [...store.objects.entries()].filter(([k]) => k.includes("/counters/")).map(([, o]) => countersSchema.parse(JSON.parse(o.body as string)));
    expect(deltas.reduce((n, d) => n + d.lowConfidence, 0)).toBe(2);

    // An existing capture.json with an explicit 0.5: the number, not "unsure".
    const explicit = fakeBucket();
    const e = capturer(settings({ enabled: true, belowConfidence: 0.5 }), explicit);
    await warm(e);
    await observe(e, observation(0.9, { unsure: true }));
    await observe(e, low(false));
    expect(records(explicit).map((r) => r.predictions[0]?.score.toFixed(2))).toEqual(["0.45"]);
  });

  it("counts a capture in the counters even when the same answer's flush has already written them", async () => {
    const store = fakeBucket();
    // flushMs 0: every answer flushes, so the flush starts before its own capture has finished.
    const c = capturer(settings({ enabled: true, belowConfidence: 0.6 }), store, { flushMs: 0 });
    await warm(c);
    await observe(c, observation(0.55));
    await observe(c, observation(0.9)); // flushes what the capture counted after the previous flush
    const deltas = [...store.objects.entries()].filter(([k]) => k.includes("/counters/")).map(([, o]) => countersSchema.parse(JSON.parse(o.body as string)));
    expect(records(store).length).toBe(1);
    expect(deltas.reduce((n, d) => n + d.captured, 0)).toBe(records(store).length);
    expect(deltas.reduce((n, d) => n + d.requests, 0)).toBe(3);
  });

  it("samples sure answers at the configured rate and resizes large inputs to a PNG within maxSide", async () => {
    const store = fakeBucket();
    const c = capturer(settings({ enabled: true, belowConfidence: 0, sampleRate: 0.5, maxSide: 32 }), store, { random: () => 0.2 });
    await warm(c); // sampled too, but the settings were not known yet: not stored
    expect(records(store)).toEqual([]);
    await observe(c, observation(0.99));
    const [r] = records(store);
    expect(r).toMatchObject({ reason: "sampled", image: { contentType: "image/png", resized: true, width: 32, height: 24 } });
  });

  it("drops a capture that needs the decode slot while classifications wait for it, and bounds captures in flight", async () => {
    const store = fakeBucket();
    let idle = false;
    const c = capturer(settings({ enabled: true, belowConfidence: 1.01, maxSide: 32 }), store, { idle: () => idle });
    await warm(c);
    await observe(c, observation(0.5)); // 40 px > 32: needs resizing, and the slot is wanted
    expect(records(store)).toEqual([]);
    expect(c.stats().busy).toBe(1);
    idle = true;
    // One decoded image at a time: of 4 at once, 1 is stored and 3 are dropped.
    const work = Array.from({ length: 4 }, () => observe(c, observation(0.5)));
    await Promise.all(work);
    expect(records(store).length).toBe(1);
    expect(c.stats().busy).toBe(1 + 3);
  });

  it("resizes with the real admission control: the classification that just left the decode slot does not count as waiting", async () => {
    const store = fakeBucket();
    const admission = createAdmission({ concurrent: 1, queued: 16 });
    const c = capturer(settings({ enabled: true, belowConfidence: 1.01, maxSide: 32 }), store, {
      exclusive: (work) => admission.exclusive(work),
      idle: () => admission.idle(),
    });
    await warm(c);
    // As app.ts does: decode and infer in the slot, then observe in the same tick, inside the admitted request.
    let after: Promise<void> | null = null;
    await admission.admit(async () => {
      await admission.exclusive(async () => {});
      after = c.observe(observation(0.5));
    });
    await (after ?? Promise.resolve());
    expect(records(store).map((r) => r.image)).toMatchObject([{ contentType: "image/png", resized: true, width: 32 }]);
    expect(c.stats().busy).toBe(0);
  });

  it("files counts under the day they were made and flushes a finished day at once", async () => {
    const store = fakeBucket();
    let now = new Date("2026-11-29T23:59:30Z");
    const c = capturer(settings(null), store, { now: () => now });
    await observe(c, observation(0.9)); // an isolate's first answer flushes at once
    await observe(c, observation(0.9));
    now = new Date("2026-11-30T00:00:10Z");
    await observe(c, observation(0.9)); // a new day: the 29th's counts are complete, flushed
    const files = [...store.objects.entries()].filter(([k]) => k.includes("/counters/"));
    const byDay = files.map(([k, o]) => [k.split("/")[3], countersSchema.parse(JSON.parse(o.body as string)).requests]);
    expect(byDay).toEqual([
      ["2026-11-29", 1],
      ["2026-11-29", 1],
      ["2026-11-30", 1],
    ]);
  });

  it("honours the opt-out: nothing stored, counted as opted out", async () => {
    const store = fakeBucket();
    const c = capturer(settings({ enabled: true, belowConfidence: 1.01 }), store);
    await warm(c);
    await observe(c, observation(0.5, { optOut: true }));
    expect(records(store)).toEqual([]);
    expect(c.stats()).toMatchObject({ optedOut: 1, captured: 0 });
  });

  it("keeps the daily count cap across isolates (compare-and-swap on one quota object)", async () => {
    const store = fakeBucket();
    const config = settings({ enabled: true, belowConfidence: 1.01, maxPerDay: 5 });
    const isolates = [capturer(config, store), capturer(config, store), capturer(config, store)];
    for (const c of isolates) await warm(c);
    // Isolates at once; each one capture after another (an isolate holds one decoded image at a time).
    await Promise.all(
      isolates.map(async (c) => {
        for (let i = 0; i < 4; i++) await observe(c, observation(0.5));
      }),
    );
    const quota = JSON.parse(store.objects.get(keys.captureQuota("pets", new Date().toISOString().slice(0, 10)))?.body as string);
    expect(quota.count).toBe(5);
    // Isolates lease captures from the shared count: never more than the cap, some room possibly unused.
    const stats = isolates.map((c) => c.stats());
    const stored = stats.reduce((a, s) => a + s.captured, 0);
    expect(stored).toBeLessThanOrEqual(5);
    expect(stored).toBeGreaterThanOrEqual(4);
    expect(records(store).length).toBe(stored);
    expect(stats.reduce((a, s) => a + s.overCap + s.captured + s.failed, 0)).toBe(12);
  });

  it("holds a cap exactly for one isolate, taking its quota 10 captures at a time", async () => {
    const store = fakeBucket();
    let quotaWrites = 0;
    const put = store.put.bind(store);
    store.put = async (key, ...rest) => {
      if (key.includes("/quota/")) quotaWrites++;
      return put(key, ...rest);
    };
    const c = capturer(settings({ enabled: true, belowConfidence: 1.01, maxPerDay: 25 }), store);
    await warm(c);
    for (let i = 0; i < 30; i++) await observe(c, observation(0.5));
    expect(records(store).length).toBe(25);
    expect(c.stats().overCap).toBe(5);
    expect(quotaWrites).toBe(3); // 10 + 10 + 5
  });

  it("leases do not use up the byte cap faster than the captures do, and a burst of 60 at once is all stored", async () => {
    const store = fakeBucket();
    const c = capturer(settings({ enabled: true, belowConfidence: 1.01, maxPerDay: 100, maxBytesPerDay: 3 * 1024 * 1024 }), store);
    await warm(c);
    for (let i = 0; i < 40; i++) await observe(c, observation(0.5)); // 1200 bytes each: 48 KB of 3 MB
    expect(records(store).length).toBe(40);
    // 60 captures whose quota requests overlap (a slow quota read), each encoded once the previous one is.
    const get = store.get.bind(store);
    store.get = async (key) => {
      if (key.includes("/quota/")) await new Promise((r) => setTimeout(r, 5));
      return get(key);
    };
    const burst: Promise<void>[] = [];
    for (let i = 0; i < 60; i++) {
      burst.push(observe(c, observation(0.5)));
      await new Promise((r) => setTimeout(r, 0));
    }
    await Promise.all(burst);
    expect(records(store).length).toBe(100);
    expect(c.stats()).toMatchObject({ captured: 100, overCap: 0, failed: 0 });
    await observe(c, observation(0.5));
    expect(c.stats().overCap).toBe(1);
  });

  it("keeps the daily byte cap", async () => {
    const store = fakeBucket();
    const c = capturer(settings({ enabled: true, belowConfidence: 1.01, maxBytesPerDay: 2500 }), store);
    await warm(c);
    for (let i = 0; i < 4; i++) await observe(c, observation(0.5)); // 1200 bytes each
    expect(records(store).length).toBe(2);
    expect(c.stats().overCap).toBe(2);
  });

  it("captures again when the daily cap is raised mid-day, in an isolate that had already reached the old cap", async () => {
    const store = fakeBucket();
    let config = { enabled: true, belowConfidence: 1.01, maxPerDay: 2 };
    const source: ModelSource = {
      getIfChanged: async () => ({ status: 200, bytes: new TextEncoder().encode(JSON.stringify(config)), etag: `"${config.maxPerDay}"` }),
      get: async () => null,
      async *listFolders() {},
    };
    let now = Date.now();
    vi.spyOn(Date, "now").mockImplementation(() => now);
    const c = capturer(source, store, { ttlMs: 1000 });
    await warm(c);
    for (let i = 0; i < 3; i++) await observe(c, observation(0.5));
    expect(c.stats()).toMatchObject({ captured: 2, overCap: 1 });
    config = { ...config, maxPerDay: 4 }; // the operator raises the cap (edgetune capture --max-per-day 4)
    now += 1001; // past the settings' TTL: the next answer re-reads them, the one after captures
    for (let i = 0; i < 4; i++) await observe(c, observation(0.5));
    expect(records(store).length).toBe(4);
    expect(c.stats()).toMatchObject({ captured: 4, overCap: 1 + 2 });
    vi.restoreAllMocks();
  });

  it("replaces a quota file that is not JSON (the edge's key may write there) instead of failing every capture of the day", async () => {
    const store = fakeBucket();
    store.objects.set(keys.captureQuota("pets", new Date().toISOString().slice(0, 10)), { body: "<html>not a quota", etag: '"x"' });
    const c = capturer(settings({ enabled: true, belowConfidence: 1.01 }), store);
    await warm(c);
    await observe(c, observation(0.5));
    expect(c.stats()).toMatchObject({ captured: 1, failed: 0 });
  });

  it("never rejects when storage is down: failures are counted, counters kept for the next flush", async () => {
    const store = fakeBucket({ failPuts: true });
    const c = capturer(settings({ enabled: true, belowConfidence: 1.01 }), store, { flushMs: 0 });
    await warm(c);
    await expect(observe(c, observation(0.5))).resolves.toBeUndefined();
    expect(c.stats().failed).toBeGreaterThanOrEqual(1);
    expect(c.stats().captured).toBe(0);
  });

  it("stores nothing after a capture ran out of time, even when the bucket answers later", async () => {
    const store = fakeBucket();
    const get = store.get.bind(store);
    let slow = true;
    store.get = async (key) => {
      if (slow && key.includes("/quota/")) await new Promise((r) => setTimeout(r, 300));
      return get(key);
    };
    const c = capturer(settings({ enabled: true, belowConfidence: 1.01 }), store, { workDeadlineMs: 100 });
    await warm(c);
    await observe(c, observation(0.5)); // resolves at its deadline, counted as failed
    expect(c.stats()).toMatchObject({ failed: 1, captured: 0 });
    slow = false;
    await new Promise((r) => setTimeout(r, 500)); // the quota read answers meanwhile
    expect(records(store)).toEqual([]);
    expect([...store.objects.keys()].filter((k) => k.includes("/images/"))).toEqual([]);
  });

  it("reads capture.json once per TTL", async () => {
    const source = settings({ enabled: false });
    const c = capturer(source, fakeBucket());
    for (let i = 0; i < 5; i++) await observe(c, observation(0.5));
    expect(source.reads).toBe(1);
  });
});

describe("the edge's writes", () => {
  const hostile = [
    "../models/pets",
    "pets/../../models",
    "a/b",
    "pets/images",
    "",
    ".",
    "..",
    "pets%2f..",
    "PETS",
    "pets\u0000",
    "x".repeat(80),
    "captures/../models",
  ];

  it("isCaptureKey accepts only keys under captures/<valid model>/ without dot segments", () => {
    expect(isCaptureKey(keys.captureFile("pets", "2026-11-29", "20261129T101500-abcd12340001", "png"))).toBe(true);
    expect(isCaptureKey(keys.captureQuota("a.b_c-9", "2026-11-29"))).toBe(true);
    for (const name of hostile) expect(isCaptureKey(keys.captureQuota(name, "2026-11-29")), name).toBe(false);
    expect(isCaptureKey(keys.captureMonitor("pets"))).toBe(true);
    expect(isCaptureKey(keys.captureDecisions("pets"), true)).toBe(true);
    expect(isCaptureKey("captures/pets/images/2026-11-29/", true)).toBe(true);
    expect(isCaptureKey("captures/pets/images/../", true)).toBe(false);
    expect(isCaptureKey("captures/pets/decisions/2026-11-29/", true)).toBe(false);
    for (const key of [
      "models/pets/current.json",
      "captures/pets",
      "captures//x",
      "captures/pets/../x",
      "captures/pets/images/../../models/x",
      "captures/a/b/quota/2026-11-29.json",
      "captures/pets/images/2026-11-29/../x",
      "captures/pets/other/2026-11-29/x",
      "datasets/pets/cat/a.png",
      "/captures/pets/x",
    ]) {
      expect(isCaptureKey(key), key).toBe(false);
    }
  });

  it("sends no write outside captures/ whatever the model name: every PUT the worker's store builds is checked", async () => {
    const requests: { method: string; url: string }[] = [];
    vi.stubGlobal("fetch", async (req: Request) => {
      requests.push({ method: req.method, url: req.url });
      return new Response(null, { status: req.method === "GET" ? 404 : 200 });
    });
    const store = createCaptureStore({ S3_BUCKET: "b", S3_ENDPOINT: "http://s3.test", AWS_ACCESS_KEY_ID: "k", AWS_SECRET_ACCESS_KEY: "s" }) as CaptureStore;
    const names = [...hostile, "pets", "a.b", "9-lives"];
    const config: ModelSource = {
      getIfChanged: async () => ({ status: 200, bytes: new TextEncoder().encode('{"enabled":true,"belowConfidence":1.01}'), etag: '"c"' }),
      get: async () => null,
      async *listFolders() {},
    };
    for (const model of names) {
      const c = capturer(config, store, { flushMs: 0 });
      await warm(c, model);
      await observe(c, observation(0.5, { model }));
    }
    const writes = requests.filter((r) => r.method === "PUT");
    expect(writes.length).toBeGreaterThan(0); // the valid names did write
    for (const w of writes) expect(new URL(w.url).pathname).toMatch(/^\/b\/captures\/(pets|a\.b|9-lives)\//);
    for (const r of requests) expect(new URL(r.url).pathname.startsWith("/b/captures/")).toBe(true);
  });
});
