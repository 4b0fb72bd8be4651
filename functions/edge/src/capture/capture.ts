import {
  CAPTURE_OFF,
  type CaptureConfig,
  type CaptureQuota,
  type CaptureRecord,
  type Counters,
  captureConfigSchema,
  captureQuotaSchema,
  captureRule,
  confidenceBin,
  countLabel,
  DEFAULT_BELOW,
  lowConfidenceThreshold,
  mergeCounters,
  noCounts,
} from "#shared/contracts/capture.ts";
import { tryParseContractJson } from "#shared/contracts/parse.ts";
import { fitWithin } from "#shared/image/fit.ts";
import { keys } from "#shared/keys.ts";
import type { Pixels } from "#shared/preprocess.ts";
import { withDeadline } from "../deadline.ts";
import type { ModelSource } from "../model/source.ts";
import type { CaptureStore } from "./store.ts";

/**
 * The edge's half of the traffic loop (contracts/capture.ts): per model, settings read from the bucket
 * (`models/<model>/capture.json`, re-read like the pointer), inputs stored for review when the model was
 * unsure or by random sampling, within daily caps shared by all isolates, and counters flushed as deltas.
 *
 * `observe` runs in the request once the answer is computed, and is synchronous: it counts, decides with
 * the settings it already has, and returns the work that must happen after the answer (`waitUntil`), or
 * null. A request that is not captured keeps nothing alive; a captured one keeps its decoded pixels until
 * they are encoded as a PNG (one decoded image per isolate), then that PNG until it is stored (within
 * `MAX_IN_FLIGHT_BYTES`); beyond that a capture is dropped, counted `busy`. Every bucket request has a deadline, and every failure is counted (`failed`), never
 * thrown: capture can neither delay nor fail a classification. Resizing and encoding need the decode
 * slot; they run only when no classification is waiting for it, else the capture is dropped (`busy`).
 */
export interface Observation {
  model: string;
  version: string;
  labels: readonly string[];
  scores: Float32Array;
  /**
   * The served version's own answer was "unsure" (its per-label thresholds, never the caller's
   * `?threshold=`); undefined for a version trained before thresholds. Capture's rule when the operator
   * set no number.
   */
  unsure: boolean | undefined;
  /** The decoded input (what a capture stores, re-encoded). */
  pixels: Pixels;
  optOut: boolean;
}

export interface CaptureStats {
  captured: number;
  /** Not stored: a daily cap was reached. */
  overCap: number;
  /** Not stored: the isolate was busy (classifications waiting, or captures already on their way). */
  busy: number;
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

/** Captures and bytes an isolate takes from the day's quota at once (see `reserve`). */
const LEASE_COUNT = 10;
/** Bytes taken per leased capture (a 512 px photo is 200–530 KB as PNG; at least a capture's own size is taken). */
const LEASE_BYTES_EACH = 512 * 1024;
/** A quota file is a few dozen bytes; anything larger was not written by the edge (a read is refused, the capture counted failed). */
const MAX_QUOTA_BYTES = 4096;
/** Compare-and-swap attempts on the day's quota, with a random back-off between them (isolates collide rarely). */
const CAS_ATTEMPTS = 8;
/**
 * What captures on their way may hold in one isolate: encoded PNGs waiting to be stored, a new capture
 * starting only below this many bytes (so at most this plus one PNG), besides the one decoded image
 * waiting to be encoded.
 */
export const MAX_IN_FLIGHT_BYTES = 8 * 1024 * 1024;
/** How long one capture, or one flush of counters, may take in all (waitUntil work ends at 30 s). */
const WORK_DEADLINE_MS = 20_000;
/** How long a settings read may take before the last known settings are kept. */
const SETTINGS_DEADLINE_MS = 5_000;
/** One bucket request of a capture (also the store's own default). */
const REQUEST_DEADLINE_MS = 10_000;

/** One capture's claim on the day's quota, with its deadline checks. */
interface Reservation {
  store: CaptureStore;
  model: string;
  today: string;
  bytes: number;
  config: CaptureConfig;
  inTime: () => void;
  signal: () => AbortSignal;
}

export interface CapturerOptions {
  /** How long capture.json is trusted before it is read again. */
  ttlMs: number;
  flushMs: number;
  encodePng: PngEncoder;
  /** Runs `work` in the isolate's decode slot (http/admission.ts). */
  exclusive: <T>(work: () => Promise<T>) => Promise<T>;
  /** True when no classification waits for a place or the slot. */
  idle: () => boolean;
  log: (fields: Record<string, unknown>) => void;
  random?: () => number;
  now?: () => Date;
  /** For tests: the whole-capture deadline (default 20 s). */
  workDeadlineMs?: number;
}

interface Settings {
  config: CaptureConfig;
  etag?: string;
  readAt: number;
  refreshing?: Promise<void>;
}

export class Capturer {
  private readonly source: ModelSource;
  private readonly store: CaptureStore | null;
  private readonly options: CapturerOptions;
  private readonly settings = new Map<string, Settings>();
  /** Counter deltas by model, version and UTC day. */
  private readonly counters = new Map<string, Counters>();
  /** 0: the isolate's first answer flushes at once, so a short-lived isolate still reports. */
  private lastFlush = 0;
  private flushing = false;
  private seq = 0;
  private inFlightBytes = 0;
  private decodedInFlight = false;
  /** Captures (and bytes) this isolate has taken from the day's quota and not used yet, per model and day. */
  private readonly leases = new Map<string, { count: number; bytes: number }>();
  /** A lease request in flight per model and day: resolves true when it added to the lease (or failed), false when the caps are reached. */
  private readonly leasing = new Map<string, Promise<boolean>>();
  /**
   * Days whose caps this isolate saw reached, per model, with the caps it saw: no more quota reads for
   * them while the settings keep those caps (a cap raised mid-day opens the day again).
   */
  private readonly full = new Map<string, { maxPerDay: number; maxBytesPerDay: number }>();
  private readonly totals: CaptureStats = { captured: 0, overCap: 0, busy: 0, failed: 0, optedOut: 0, flushed: 0 };
  private readonly isolate = Math.random().toString(36).slice(2, 10);

  constructor(source: ModelSource, store: CaptureStore | null, options: CapturerOptions) {
    this.source = source;
    this.store = store;
    this.options = options;
  }

  stats(): CaptureStats {
    return { ...this.totals };
  }

  /** Counts and decides now; returns what must run after the answer, or null. Never throws. */
  observe(o: Observation): Promise<void> | null {
    const work: Promise<void>[] = [];
    try {
      const known = this.settings.get(o.model);
      if (!known || Date.now() - known.readAt >= this.options.ttlMs) work.push(this.refresh(o.model));
      // Until the first read answers, this isolate captures nothing of the model (and counts with the default threshold).
      const config = known?.config ?? CAPTURE_OFF;
      const now = this.now();
      const top = argmax(o.scores);
      const score = o.scores[top] as number;
      const counters = this.countersFor(o.model, o.version, now);
      const label = o.labels[top] as string;
      counters.requests++;
      countLabel(counters.labels, label, 1);
      const bin = confidenceBin(score);
      counters.confidence[bin] = (counters.confidence[bin] ?? 0) + 1;
      if (score < lowConfidenceThreshold(config)) counters.lowConfidence++;
      const rule = captureRule(config);
      // No number set: classify's own "unsure"; a version without thresholds has none, and keeps the old default.
      const unsure = rule.kind === "below" ? score < rule.score : (o.unsure ?? score < DEFAULT_BELOW);
      const reason = !config.enabled ? null : unsure ? "low_confidence" : (this.options.random ?? Math.random)() < config.sampleRate ? "sampled" : null;
      if (reason && o.optOut) this.count(counters, "optedOut");
      else if (reason && this.isFull(`${o.model}/${day(now)}`, config)) this.count(counters, "overCap");
      else if (reason) {
        const job = this.capture(o, config, reason, now);
        if (job) work.push(job);
        else this.count(counters, "busy");
      }
      if (this.flushDue(now)) work.push(this.flush());
    } catch (e) {
      this.failed(o.model, o.version, e);
    }
    return work.length > 0 ? Promise.all(work).then(() => undefined) : null;
  }

  /**
   * Stores one input; null when the isolate holds enough captures already (the caller counts it busy).
   * The stored copy is always a PNG encoded here from the decoded pixels (resized to fit `maxSide`), never
   * the bytes as sent: a file can carry metadata anywhere its decoder skips (EXIF after a progressive
   * JPEG's first scan, bytes after EOI or IEND, private PNG or WebP chunks, a second APP0), and only an
   * encoder we run decides what the stored file holds. The pixels are held until encoded (one decoded
   * image per isolate); the PNG then counts towards MAX_IN_FLIGHT_BYTES until it is stored.
   */
  private capture(o: Observation, config: CaptureConfig, reason: CaptureRecord["reason"], now: Date): Promise<void> | null {
    const store = this.store;
    if (!store) {
      this.failed(o.model, o.version, new Error("capture is on but the worker has no S3 credentials (MODELS_BASE_URL): nothing can be stored"));
      return Promise.resolve();
    }
    if (this.decodedInFlight || this.inFlightBytes >= MAX_IN_FLIGHT_BYTES) return null;
    this.decodedInFlight = true;
    let pixels: Pixels | null = o.pixels;
    const { width } = pixels;
    let held = 0;
    // Locals only: the closure below must not keep `o` (and with it the request body) alive.
    const { model, version, labels, scores } = o;
    // Counted when it ends, in the counters current then: a flush started by this same answer (or any
    // since) has already written and dropped the ones the answer was counted in.
    const count = (what: "captured" | "overCap" | "busy") => this.count(this.countersFor(model, version, now), what);
    // The deadline below ends the wait, not the work: the work checks it between steps, so a capture
    // that ran out of time never stores anything afterwards (it was counted as failed).
    const limit = this.options.workDeadlineMs ?? WORK_DEADLINE_MS;
    const deadline = Date.now() + limit;
    const inTime = () => {
      if (Date.now() > deadline) throw new Error(`capture took longer than ${limit / 1000} s`);
    };
    // Each bucket request of this capture ends by its deadline too: nothing lands after it.
    const signal = () => AbortSignal.timeout(Math.max(1, Math.min(REQUEST_DEADLINE_MS, deadline - Date.now())));
    const release = () => {
      if (pixels) this.decodedInFlight = false;
      pixels = null;
    };
    const run = async () => {
      if (!this.options.idle()) return count("busy");
      const source = pixels as Pixels;
      const image = await this.options.exclusive(async () => {
        const small = fitWithin(source, config.maxSide);
        const bytes = await this.options.encodePng(small);
        return { bytes, contentType: "image/png" as const, width: small.width, height: small.height, resized: small.width !== width };
      });
      // Encoded: the decoded image is no longer needed, and the next capture may use the slot.
      release();
      held = image.bytes.length;
      this.inFlightBytes += held;
      const today = day(now);
      inTime();
      if (!(await this.reserve({ store, model, today, bytes: image.bytes.length, config, inTime, signal }))) {
        inTime(); // a capture past its deadline is counted failed, not also over the cap
        this.full.set(`${model}/${today}`, { maxPerDay: config.maxPerDay, maxBytesPerDay: config.maxBytesPerDay });
        return count("overCap");
      }
      const stamp = now.toISOString().replaceAll(/[-:]/g, "").slice(0, 15);
      const id = `${stamp}-${this.isolate}${(this.seq++).toString(36).padStart(4, "0")}`;
      const imageKey = keys.captureFile(model, today, id, image.contentType.split("/")[1] as string);
      const predictions = Array.from(scores, (s, i) => ({ label: labels[i] as string, score: s }))
        .sort((a, b) => b.score - a.score)
        .slice(0, 5);
      const record: CaptureRecord = {
        schemaVersion: 1,
        id,
        model,
        version,
        capturedAt: now.toISOString(),
        reason,
        predictions,
        image: { key: imageKey, contentType: image.contentType, bytes: image.bytes.length, width: image.width, height: image.height, resized: image.resized },
      };
      // The image first, the record last: the review lists records, so it never finds one without its image.
      inTime();
      await store.put(imageKey, image.bytes, image.contentType, {}, signal());
      inTime();
      await store.put(keys.captureRecord(model, id), JSON.stringify(record), "application/json", {}, signal());
      count("captured");
    };
    // One deadline for the whole capture (quota, image, record), inside Workers' 30 s for waitUntil work,
    // so the accounting below always runs.
    return withDeadline(run(), limit, () => new Error(`no answer within ${limit} ms`))
      .catch((e) => this.failed(model, version, e))
      .finally(() => {
        release();
        this.inFlightBytes -= held;
      });
  }

  /**
   * Counts one capture of `bytes` against the day's caps, for all isolates at once. The shared count is
   * an S3 object updated by compare-and-swap; an isolate takes a lease of up to LEASE_COUNT captures
   * (and about LEASE_BYTES_EACH bytes for each) at a time and spends it locally, so most captures cost no
   * quota request. The caps hold as upper bounds; a lease an isolate does not use up (it was evicted) only
   * leaves room unused.
   */
  private async reserve(r: Reservation): Promise<boolean> {
    const { model, today, bytes, inTime } = r;
    const id = `${model}/${today}`;
    // Until the capture's deadline: spend from the lease; else wait for the lease request in flight, or make one.
    for (;;) {
      inTime();
      const lease = this.leases.get(id);
      if (lease && lease.count >= 1 && lease.bytes >= bytes) {
        lease.count--;
        lease.bytes -= bytes;
        return true;
      }
      // One lease request at a time per model and day: concurrent captures wait for it and share it.
      const pending = this.leasing.get(id);
      if (pending) {
        if (!(await pending)) return false;
        continue;
      }
      const acquiring = this.acquireLease(r);
      this.leasing.set(
        id,
        acquiring.catch(() => true), // a failed request: the waiters try again themselves
      );
      try {
        if (!(await acquiring)) return false; // the caps are reached
      } finally {
        this.leasing.delete(id);
      }
    }
  }

  /**
   * Adds to this isolate's lease from the day's shared quota what it lacks: up to LEASE_COUNT captures,
   * and bytes for them (at least `bytes`, about LEASE_BYTES_EACH per capture) — never more than the caps
   * leave. False when the caps are reached.
   */
  private async acquireLease({ store, model, today, bytes, config, inTime, signal }: Reservation): Promise<boolean> {
    const key = keys.captureQuota(model, today);
    const id = `${model}/${today}`;
    const lease = this.leases.get(id) ?? { count: 0, bytes: 0 };
    for (let attempt = 0; attempt < CAS_ATTEMPTS; attempt++) {
      inTime();
      const current = await store.get(key, signal(), MAX_QUOTA_BYTES);
      let quota: CaptureQuota = { day: today, count: 0, bytes: 0 };
      if (current) {
        // A file that is not a quota (the edge's key may write here) is replaced by the next swap, as if
        // the day had just begun: whoever could forge it could as well have written a count of 0.
        const parsed = tryParseContractJson(captureQuotaSchema, current.bytes);
        if (parsed.success) quota = parsed.data;
      }
      const count = lease.count >= 1 ? 0 : Math.min(LEASE_COUNT, config.maxPerDay - quota.count);
      const wantBytes = lease.bytes >= bytes ? 0 : Math.max(bytes - lease.bytes, LEASE_BYTES_EACH * Math.max(count, 1));
      const moreBytes = Math.min(wantBytes, config.maxBytesPerDay - quota.bytes);
      if ((lease.count < 1 && count < 1) || lease.bytes + moreBytes < bytes) return false;
      const next = JSON.stringify({ day: today, count: quota.count + count, bytes: quota.bytes + moreBytes });
      if (await store.put(key, next, "application/json", current ? { ifMatch: current.etag } : { ifNoneMatch: "*" }, signal())) {
        // Added to what is left of the lease: nothing taken from the quota is dropped while the isolate lives.
        this.leases.set(id, { count: lease.count + count, bytes: lease.bytes + moreBytes });
        return true;
      }
      await new Promise((resolve) => setTimeout(resolve, (5 + Math.random() * 20) * (attempt + 1)));
    }
    throw new Error(`the capture quota of ${model} stayed contended after ${CAS_ATTEMPTS} attempts`);
  }

  /** Re-reads the model's capture settings: one read at a time per model; a failed or slow read keeps the last known ones. */
  private refresh(model: string): Promise<void> {
    const known = this.settings.get(model);
    if (known?.refreshing) return known.refreshing;
    const entry: Settings = known ?? { config: CAPTURE_OFF, readAt: 0 };
    const read = async () => {
      const r = await withDeadline(
        this.source.getIfChanged(keys.captureConfig(model), entry.etag),
        SETTINGS_DEADLINE_MS,
        () => new Error(`no answer within ${SETTINGS_DEADLINE_MS} ms`),
      );
      if (r.status === 200) {
        const parsed = tryParseContractJson(captureConfigSchema, r.bytes as Uint8Array);
        entry.config = parsed.success ? parsed.data : CAPTURE_OFF;
        if (!parsed.success) this.options.log({ level: "warn", message: "capture.json is invalid: capture stays off", model, problem: parsed.problem });
      } else if (r.status === 404) entry.config = CAPTURE_OFF;
      entry.etag = r.status === 404 ? undefined : (r.etag ?? entry.etag);
    };
    entry.refreshing = read()
      .catch((e) => {
        this.totals.failed++;
        this.options.log({
          level: "warn",
          message: "capture settings not read; the last known ones stay",
          model,
          error: e instanceof Error ? e.message : String(e),
        });
      })
      .finally(() => {
        entry.readAt = Date.now();
        entry.refreshing = undefined;
      });
    this.settings.set(model, entry);
    return entry.refreshing;
  }

  /** True while the caps this isolate saw reached for `id` (model/day) are still the configured ones, or higher. */
  private isFull(id: string, config: CaptureConfig): boolean {
    const seen = this.full.get(id);
    return seen !== undefined && config.maxPerDay <= seen.maxPerDay && config.maxBytesPerDay <= seen.maxBytesPerDay;
  }

  private countersFor(model: string, version: string, now: Date): Counters {
    const id = `${model}@${version}@${day(now)}`;
    let c = this.counters.get(id);
    if (!c) {
      c = { schemaVersion: 1, model, version, from: now.toISOString(), to: now.toISOString(), ...noCounts() };
      this.counters.set(id, c);
    }
    return c;
  }

  private count(counters: Counters, what: "captured" | "overCap" | "busy" | "optedOut") {
    counters[what]++;
    this.totals[what]++;
  }

  private failed(model: string, version: string, e: unknown) {
    this.totals.failed++;
    this.countersFor(model, version, this.now()).failed++;
    this.options.log({ level: "warn", message: "capture failed (the answer was not affected)", model, error: e instanceof Error ? e.message : String(e) });
  }

  /** Due on an isolate's first answer, every flushMs, and when a day's counts are complete. */
  private flushDue(now: Date): boolean {
    if (!this.store || this.flushing || this.counters.size === 0) return false;
    if (Date.now() - this.lastFlush >= this.options.flushMs) return true;
    const today = day(now);
    return [...this.counters.values()].some((c) => c.from.slice(0, 10) < today);
  }

  /** Writes every counter delta; a failed write keeps its counts for the next flush. */
  private async flush(): Promise<void> {
    const store = this.store as CaptureStore;
    this.flushing = true;
    this.lastFlush = Date.now();
    const batch = [...this.counters.values()];
    this.counters.clear();
    const to = this.now().toISOString();
    const started = Date.now();
    try {
      for (const c of batch) {
        if (Date.now() - started > WORK_DEADLINE_MS) {
          // Out of time: keep the rest for the next flush.
          mergeCounters(this.countersFor(c.model, c.version, new Date(c.from)), c);
          continue;
        }
        c.to = to;
        const stamp = `${to.replaceAll(/[-:.]/g, "").slice(0, 18)}-${this.isolate}-${(this.seq++).toString(36)}`;
        try {
          await store.put(keys.captureCounterFile(c.model, c.from.slice(0, 10), stamp), JSON.stringify(c), "application/json");
          this.totals.flushed++;
        } catch (e) {
          this.totals.failed++;
          this.options.log({
            level: "warn",
            message: "counters not written; kept for the next flush",
            model: c.model,
            error: e instanceof Error ? e.message : String(e),
          });
          const kept = this.countersFor(c.model, c.version, new Date(c.from));
          mergeCounters(kept, c);
          kept.failed++;
        }
      }
    } finally {
      this.flushing = false;
    }
  }

  private now(): Date {
    return this.options.now?.() ?? new Date();
  }
}

const day = (d: Date) => d.toISOString().slice(0, 10);

function argmax(values: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < values.length; i++) if ((values[i] as number) > (values[best] as number)) best = i;
  return best;
}
