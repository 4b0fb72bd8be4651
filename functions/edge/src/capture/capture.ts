import {
  CAPTURE_OFF,
  type CaptureConfig,
  type CaptureQuota,
  type CaptureRecord,
  CONFIDENCE_BINS,
  type Counters,
  captureConfigSchema,
  captureQuotaSchema,
  confidenceBin,
} from "../../../../shared/contracts/capture.ts";
import { fitWithin } from "../../../../shared/image/fit.ts";
import { keys } from "../../../../shared/keys.ts";
import type { Pixels } from "../../../../shared/preprocess.ts";
import type { ModelSource } from "../model/source.ts";
import type { CaptureStore } from "./store.ts";

/**
 * The edge's half of the traffic loop (contracts/capture.ts): per model, settings read from the bucket
 * (`models/<model>/capture.json`, re-read like the pointer), inputs stored for review when the model was
 * unsure or by random sampling, within daily caps shared by all isolates, and counters flushed as deltas.
 *
 * Everything here runs after the answer is sent (`waitUntil`) and swallows its errors into the `failed`
 * counter: capture can neither delay nor fail a classification. The one piece of work that touches the
 * image — resizing a large input and encoding it — waits for the isolate's decode slot, so captured
 * pixels never add a second large image to memory.
 */
export interface Observation {
  model: string;
  version: string;
  labels: readonly string[];
  scores: Float32Array;
  /** The request body as received, and its format. */
  bytes: Uint8Array;
  contentType: CaptureRecord["image"]["contentType"];
  pixels: Pixels;
  optOut: boolean;
}

export interface CaptureStats {
  captured: number;
  overCap: number;
  failed: number;
  optedOut: number;
  /** Counter deltas written to the bucket. */
  flushed: number;
}

/** The header a client sends to keep its image out of storage (also honoured: `Sec-GPC: 1`). */
export const OPT_OUT_HEADER = "x-edgetune-capture";
export const isOptOut = (headers: Headers) => headers.get(OPT_OUT_HEADER)?.trim().toLowerCase() === "off" || headers.get("sec-gpc")?.trim() === "1";

/** Encodes RGBA pixels as PNG (the worker's libpng, @jsquash/png). */
export type PngEncoder = (pixels: Pixels) => Promise<Uint8Array>;

/** Compare-and-swap attempts on the day's quota, with a random back-off between them (isolates collide rarely). */
const CAS_ATTEMPTS = 8;

export interface CapturerOptions {
  /** How long capture.json is trusted before it is read again. */
  ttlMs: number;
  flushMs: number;
  encodePng: PngEncoder;
  /** Runs `work` when the isolate's decode slot is free (http/admission.ts). */
  exclusive: <T>(work: () => Promise<T>) => Promise<T>;
  log: (fields: Record<string, unknown>) => void;
  random?: () => number;
  now?: () => Date;
}

export class Capturer {
  private readonly settingsCache = new Map<string, { config: CaptureConfig; etag?: string; readAt: number }>();
  private readonly counters = new Map<string, Counters>();
  private lastFlush = Date.now();
  private seq = 0;
  /** Days whose caps this isolate saw reached, per model: no more quota reads for them. */
  private readonly full = new Set<string>();
  private readonly totals: CaptureStats = { captured: 0, overCap: 0, failed: 0, optedOut: 0, flushed: 0 };
  private readonly isolate = Math.random().toString(36).slice(2, 10);
  /** A large input waiting for the decode slot to be resized: at most one, so memory holds one extra image. */
  private resizing = false;

  private readonly source: ModelSource;
  private readonly store: CaptureStore | null;
  private readonly options: CapturerOptions;

  constructor(source: ModelSource, store: CaptureStore | null, options: CapturerOptions) {
    this.source = source;
    this.store = store;
    this.options = options;
  }

  stats(): CaptureStats {
    return { ...this.totals };
  }

  /** Everything capture does for one answered request; never rejects. */
  async observe(o: Observation): Promise<void> {
    try {
      const config = await this.settings(o.model);
      const top = argmax(o.scores);
      const score = o.scores[top] as number;
      const threshold = config.enabled ? config.belowConfidence : CAPTURE_OFF.belowConfidence;
      const counters = this.countersFor(o.model, o.version);
      counters.requests++;
      const label = o.labels[top] as string;
      counters.labels[label] = (counters.labels[label] ?? 0) + 1;
      counters.confidence[confidenceBin(score)] = (counters.confidence[confidenceBin(score)] ?? 0) + 1;
      if (score < threshold) counters.lowConfidence++;
      if (config.enabled) {
        const reason = score < config.belowConfidence ? "low_confidence" : (this.options.random ?? Math.random)() < config.sampleRate ? "sampled" : null;
        if (reason && o.optOut) {
          counters.optedOut++;
          this.totals.optedOut++;
        } else if (reason) {
          await this.capture(o, config, reason, label, counters);
        }
      }
    } catch (e) {
      this.failed(o.model, o.version, e);
    }
    await this.flushIfDue();
  }

  private async capture(o: Observation, config: CaptureConfig, reason: CaptureRecord["reason"], _label: string, counters: Counters) {
    if (!this.store) throw new Error("capture is on but the worker has no S3 credentials (MODELS_BASE_URL): nothing can be stored");
    const now = this.now();
    const day = now.toISOString().slice(0, 10);
    if (this.full.has(`${o.model}/${day}`)) {
      counters.overCap++;
      this.totals.overCap++;
      return;
    }
    const large = Math.max(o.pixels.width, o.pixels.height) > config.maxSide;
    if (large && this.resizing) {
      counters.overCap++;
      this.totals.overCap++;
      return;
    }
    const image = await this.imageToStore(o, config.maxSide);
    if (!(await this.reserve(o.model, day, image.bytes.length, config))) {
      this.full.add(`${o.model}/${day}`);
      counters.overCap++;
      this.totals.overCap++;
      return;
    }
    const stamp = now.toISOString().replaceAll(/[-:]/g, "").slice(0, 15);
    const id = `${stamp}-${this.isolate}${(this.seq++).toString(36).padStart(4, "0")}`;
    const ext = image.contentType.split("/")[1] as string;
    const imageKey = keys.captureFile(o.model, day, id, ext);
    const predictions = Array.from(o.scores, (s, i) => ({ label: o.labels[i] as string, score: s }))
      .sort((a, b) => b.score - a.score)
      .slice(0, 5);
    const record: CaptureRecord = {
      schemaVersion: 1,
      id,
      model: o.model,
      version: o.version,
      capturedAt: now.toISOString(),
      reason,
      predictions,
      image: { key: imageKey, contentType: image.contentType, bytes: image.bytes.length, width: image.width, height: image.height, resized: image.resized },
    };
    // The image first, the record last: the review lists records, so it never finds one without its image.
    await this.store.put(imageKey, image.bytes, image.contentType);
    await this.store.put(keys.captureFile(o.model, day, id, "json"), JSON.stringify(record), "application/json");
    counters.captured++;
    this.totals.captured++;
  }

  /** The input as sent when it fits `maxSide`, else a PNG copy resized to fit. */
  private async imageToStore(o: Observation, maxSide: number) {
    const { width, height } = o.pixels;
    if (Math.max(width, height) <= maxSide) return { bytes: o.bytes, contentType: o.contentType, width, height, resized: false };
    this.resizing = true;
    try {
      return await this.options.exclusive(async () => {
        const small = fitWithin(o.pixels, maxSide);
        const bytes = await this.options.encodePng(small);
        return { bytes, contentType: "image/png" as const, width: small.width, height: small.height, resized: true };
      });
    } finally {
      this.resizing = false;
    }
  }

  /** Counts one capture of `bytes` against the day's caps, for all isolates at once (S3 compare-and-swap). */
  private async reserve(model: string, day: string, bytes: number, config: CaptureConfig): Promise<boolean> {
    const store = this.store as CaptureStore;
    const key = keys.captureQuota(model, day);
    for (let attempt = 0; attempt < CAS_ATTEMPTS; attempt++) {
      const current = await store.get(key);
      let quota: CaptureQuota = { day, count: 0, bytes: 0 };
      if (current) {
        const parsed = captureQuotaSchema.safeParse(JSON.parse(new TextDecoder().decode(current.bytes)));
        if (parsed.success) quota = parsed.data;
      }
      if (quota.count + 1 > config.maxPerDay || quota.bytes + bytes > config.maxBytesPerDay) return false;
      const next = JSON.stringify({ day, count: quota.count + 1, bytes: quota.bytes + bytes });
      const written = await store.put(key, next, "application/json", current ? { ifMatch: current.etag } : { ifNoneMatch: "*" });
      if (written) return true;
      await new Promise((resolve) => setTimeout(resolve, (5 + Math.random() * 20) * (attempt + 1)));
    }
    throw new Error(`the capture quota of ${model} stayed contended after ${CAS_ATTEMPTS} attempts`);
  }

  /** The model's capture settings, re-read at most every ttlMs; a failed read keeps the last known ones. */
  private async settings(model: string): Promise<CaptureConfig> {
    const cached = this.settingsCache.get(model);
    if (cached && Date.now() - cached.readAt < this.options.ttlMs) return cached.config;
    try {
      const r = await this.source.getIfChanged(keys.captureConfig(model), cached?.etag);
      let config = CAPTURE_OFF;
      if (r.status === 304 && cached) config = cached.config;
      else if (r.status === 200) {
        const parsed = captureConfigSchema.safeParse(JSON.parse(new TextDecoder().decode(r.bytes)));
        if (parsed.success) config = parsed.data;
        else this.options.log({ level: "warn", message: "capture.json is invalid: capture stays off", model, problem: parsed.error.issues[0]?.message });
      }
      this.settingsCache.set(model, { config, etag: r.etag, readAt: Date.now() });
      return config;
    } catch (e) {
      if (cached) {
        cached.readAt = Date.now();
        return cached.config;
      }
      throw e;
    }
  }

  private countersFor(model: string, version: string): Counters {
    const id = `${model}@${version}`;
    let c = this.counters.get(id);
    if (!c) {
      const now = this.now().toISOString();
      c = {
        schemaVersion: 1,
        model,
        version,
        from: now,
        to: now,
        requests: 0,
        labels: {},
        confidence: new Array(CONFIDENCE_BINS).fill(0),
        lowConfidence: 0,
        captured: 0,
        overCap: 0,
        failed: 0,
        optedOut: 0,
      };
      this.counters.set(id, c);
    }
    return c;
  }

  private failed(model: string, version: string, e: unknown) {
    this.totals.failed++;
    this.countersFor(model, version).failed++;
    this.options.log({ level: "warn", message: "capture failed (the answer was not affected)", model, error: e instanceof Error ? e.message : String(e) });
  }

  /** Writes every counter delta when flushMs has passed since the last flush; a failed write keeps its counts. */
  private async flushIfDue(): Promise<void> {
    if (!this.store || Date.now() - this.lastFlush < this.options.flushMs || this.counters.size === 0) return;
    this.lastFlush = Date.now();
    const batch = [...this.counters.values()];
    this.counters.clear();
    const to = this.now().toISOString();
    for (const c of batch) {
      c.to = to;
      const stamp = `${to.replaceAll(/[-:.]/g, "").slice(0, 18)}-${this.isolate}-${(this.seq++).toString(36)}`;
      try {
        await this.store.put(keys.captureCounterFile(c.model, c.from.slice(0, 10), stamp), JSON.stringify(c), "application/json");
        this.totals.flushed++;
      } catch (e) {
        this.totals.failed++;
        this.options.log({
          level: "warn",
          message: "counters not written; kept for the next flush",
          model: c.model,
          error: e instanceof Error ? e.message : String(e),
        });
        const kept = this.countersFor(c.model, c.version);
        merge(kept, c);
        kept.failed++;
      }
    }
  }

  private now(): Date {
    return this.options.now?.() ?? new Date();
  }
}

function merge(into: Counters, from: Counters) {
  if (from.from < into.from) into.from = from.from; // ISO times: string order is time order
  into.requests += from.requests;
  for (const [l, n] of Object.entries(from.labels)) into.labels[l] = (into.labels[l] ?? 0) + n;
  from.confidence.forEach((n, i) => {
    into.confidence[i] = (into.confidence[i] ?? 0) + n;
  });
  into.lowConfidence += from.lowConfidence;
  into.captured += from.captured;
  into.overCap += from.overCap;
  into.failed += from.failed;
  into.optedOut += from.optedOut;
}

function argmax(values: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < values.length; i++) if ((values[i] as number) > (values[best] as number)) best = i;
  return best;
}
