import * as tfl from "@tensorflow/tfjs-layers";
import { readListedFile, readMetadata, type VerifiedBytesCache } from "#shared/artifacts.ts";
import { concatBytes } from "#shared/bytes.ts";
import type { ArtifactMetadata, ModelPointer, Served } from "#shared/contracts/artifact.ts";
import { ARTIFACT_FILES, pointerSchema, SPLIT_FILES, sameServed, servedFiles } from "#shared/contracts/artifact.ts";
import { parseContractJson } from "#shared/contracts/parse.ts";
import { keys } from "#shared/keys.ts";
import { tf } from "../tf.ts";
import { BaseUnavailableError, type LoadedBase, SharedBases, weightBytes } from "./bases.ts";
import { type ModelSource, StoreAccessDeniedError } from "./source.ts";

/**
 * The models this isolate serves. A model is loaded on first use from its promoted pointer, every
 * file verified against the metadata's sha256, and warmed up. At most every `ttlMs` a request
 * triggers a conditional re-read of the pointer (in the background); a new version is loaded and
 * verified beside the old one and swapped in only when ready. Requests already running keep the
 * instance they started with; the old one is disposed when the last of them finishes. A broken new
 * version never replaces a working one: the problem is kept for /healthz. Failures back off with
 * jitter: a model that cannot be loaded is not fetched again on every request (its pointer is asked
 * for again after 0.5–1 s, then 1–2 s, … up to the TTL), and a pointer whose version already failed to
 * load is loaded again only after a longer back-off (up to 10 TTLs) unless it changes.
 *
 * A split version (metadata `split`) loads only its head and holds its shared base (bases.ts), one copy
 * per (base, size) for every head on it. Models stay loaded until the tensors the isolate holds exceed
 * the memory budget; then the least recently used go first (a base with them, once no head holds it).
 */
export interface LoadedModel {
  name: string;
  pointer: ModelPointer;
  metadata: ArtifactMetadata;
  /** The whole classifier, or for a split version its head (pooled features → probabilities). */
  model: tfl.LayersModel;
  /** Split versions: the shared base the head runs on, and the layers whose pooled outputs it takes. */
  base?: LoadedBase;
  layers?: readonly string[];
  /** Bytes of this model's own weights in tfjs memory (a head's, without its base). */
  bytes: number;
  lastUsed: number;
  loadedAt: number;
  timings: { fetchMs: number; parseMs: number; warmupMs: number };
  /** Requests currently using this instance. */
  users: number;
  retired: boolean;
}

interface Slot {
  current?: LoadedModel;
  pointerEtag?: string;
  checkedAt: number;
  checking?: Promise<void>;
  /** `code`: set when the failure has its own error code (a refused store credential). */
  lastError?: { message: string; at: number; code?: "store_access_denied" };
  /** Set when the pointer is absent: answer 404 without asking storage again until then. */
  missingUntil?: number;
  /** Failures in a row (pointer or version), and when the pointer may be asked for again. */
  failures: number;
  nextCheckAt?: number;
  /** The pointer (ETag) whose version failed to load, and when loading it may be tried again. */
  failed?: { etag?: string; retryAt: number };
}

/** Unknown names are remembered (for the TTL) only up to this many, so requests cannot grow memory. */
const MAX_SLOTS = 256;

/** What a client is told when the store refuses the worker's key. */
export const STORE_REFUSED =
  "The model store refused this worker's credentials; its operator must set them again (the details are in /healthz, for operator keys).";

type UnavailableCode = "model_not_found" | "model_unavailable" | "store_access_denied";

export class ModelUnavailableError extends Error {
  readonly code: UnavailableCode;
  /** When asking again makes sense (the Retry-After of a 503). */
  readonly retryAfterSeconds: number;
  constructor(code: UnavailableCode, message: string, retryAfterSeconds = 30) {
    super(message);
    this.code = code;
    this.retryAfterSeconds = retryAfterSeconds;
  }
}

/** The one answer for a name that is not served, also given for a model outside a client key's scope. */
export function modelNotFound(name: string): ModelUnavailableError {
  return new ModelUnavailableError("model_not_found", `No model named ${name}.`);
}

export interface RegistryOptions {
  ttlMs: number;
  /** Bytes of live tensors (tf.memory()) above which least recently used models are evicted. */
  memoryBudgetBytes: number;
  /** Verified model bytes shared by the isolates of a location (the Workers Cache API); none: always the bucket. */
  cache?: VerifiedBytesCache;
  now?: () => number;
}

export class ModelRegistry {
  private readonly slots = new Map<string, Slot>();

  private readonly source: ModelSource;
  private readonly options: RegistryOptions;
  readonly bases: SharedBases;

  constructor(source: ModelSource, options: RegistryOptions) {
    this.source = source;
    this.options = options;
    this.bases = new SharedBases(source, { ttlMs: options.ttlMs, now: options.now });
  }

  private now(): number {
    return this.options.now?.() ?? Date.now();
  }

  /**
   * The model to serve, with a lease: call `release` when done. Schedules a background pointer check
   * through `waitUntil` when the last one is older than the TTL.
   */
  async acquire(name: string, waitUntil: (p: Promise<unknown>) => void): Promise<{ model: LoadedModel; release: () => void }> {
    let slot = this.slots.get(name);
    if (!slot) {
      if (this.slots.size >= MAX_SLOTS) this.forgetUnloaded();
      slot = { checkedAt: 0, failures: 0 };
      this.slots.set(name, slot);
    }
    if (!slot.current) {
      if (slot.missingUntil && slot.missingUntil > this.now()) throw modelNotFound(name);
      // Backing off after a failure: answer from what is known, without asking storage again.
      if (!(slot.nextCheckAt && slot.nextCheckAt > this.now())) await this.check(name, slot, waitUntil);
      if (!slot.current) {
        if (slot.missingUntil) throw modelNotFound(name);
        const retryAfter = Math.max(1, Math.ceil(((slot.nextCheckAt ?? this.now()) - this.now()) / 1000));
        // The details (S3's code, the key, the secrets' names) are for operators: /healthz with an operator key.
        if (slot.lastError?.code) throw new ModelUnavailableError(slot.lastError.code, `Model ${name} cannot be loaded. ${STORE_REFUSED}`, retryAfter);
        throw new ModelUnavailableError(
          "model_unavailable",
          `Model ${name} is not available yet${slot.lastError ? `: ${slot.lastError.message}` : ""}.`,
          retryAfter,
        );
      }
    } else if (this.now() - slot.checkedAt >= this.options.ttlMs && !slot.checking) {
      waitUntil(this.check(name, slot, waitUntil));
    }
    const model = slot.current as LoadedModel;
    model.users++;
    model.lastUsed = this.now();
    let released = false;
    return {
      model,
      release: () => {
        if (released) return;
        released = true;
        model.users--;
        if (model.retired && model.users === 0) this.dispose(model);
      },
    };
  }

  /** Frees a model's weights, and lets go of its base (freed with its last holder). */
  private dispose(model: LoadedModel): void {
    model.model.dispose();
    if (model.base) this.bases.release(model.base);
  }

  private forgetUnloaded(): void {
    for (const [name, s] of this.slots) if (!s.current && !s.checking) this.slots.delete(name);
  }

  /** Models this isolate serves or tried to load (not names that simply do not exist), for /healthz. */
  status(): {
    name: string;
    version?: string;
    loadedAt?: string;
    lastError?: string;
    errorCode?: "store_access_denied";
    /** The shared base a loaded head runs on (`<sha256>-<size>`); absent for a whole model. */
    base?: string;
    bytes?: number;
  }[] {
    return [...this.slots.entries()]
      .filter(([, s]) => s.current || (s.lastError && !s.missingUntil))
      .map(([name, s]) => ({
        name,
        version: s.current?.pointer.version,
        loadedAt: s.current ? new Date(s.current.loadedAt).toISOString() : undefined,
        lastError: s.lastError?.message,
        errorCode: s.lastError?.code,
        base: s.current?.base?.key,
        bytes: s.current?.bytes,
      }));
  }

  /** Forces a pointer check now (tests, and the first request after the TTL). */
  refresh(name: string): Promise<void> {
    const slot = this.slots.get(name) ?? { checkedAt: 0, failures: 0 };
    this.slots.set(name, slot);
    return this.check(name, slot);
  }

  private check(name: string, slot: Slot, waitUntil: (p: Promise<unknown>) => void = () => {}): Promise<void> {
    slot.checking ??= this.checkNow(name, slot, waitUntil).finally(() => {
      slot.checking = undefined;
    });
    return slot.checking;
  }

  private async checkNow(name: string, slot: Slot, waitUntil: (p: Promise<unknown>) => void): Promise<void> {
    const started = this.now();
    try {
      const res = await this.source.getIfChanged(keys.pointer(name), slot.current ? slot.pointerEtag : undefined);
      slot.checkedAt = started;
      if (res.status === 304) {
        // The pointer is again the one the served model was loaded from (say, a bad pointer was put
        // back to the good one, byte for byte): whatever failed since is no longer the current state.
        this.healthy(slot);
        return;
      }
      if (res.status === 404) {
        if (!slot.current) slot.missingUntil = started + this.options.ttlMs;
        else slot.lastError = { message: "current.json has disappeared; still serving the last good version", at: started };
        return;
      }
      slot.missingUntil = undefined;
      // This very pointer failed to load a moment ago: not again until its back-off has passed.
      if (slot.failed && res.etag !== undefined && slot.failed.etag === res.etag && slot.failed.retryAt > started) {
        slot.nextCheckAt = started + this.backoff(slot.failures, this.options.ttlMs);
        return;
      }
      const pointer = parseContractJson(pointerSchema, new TextDecoder().decode(res.bytes), keys.pointer(name));
      if (slot.current && slot.current.pointer.version === pointer.version && slot.current.pointer.metadataSha256 === pointer.metadataSha256) {
        slot.pointerEtag = res.etag;
        this.healthy(slot);
        return;
      }
      let loaded: LoadedModel;
      try {
        loaded = await this.load(name, pointer, waitUntil);
      } catch (e) {
        // Twice the pointer's back-off: the pointer is cheap to ask for, the version is megabytes. A
        // version that failed for its base is tried again when its base is (the base backs off once for all).
        const retryAt = e instanceof BaseUnavailableError ? e.retryAt : started + this.backoff(slot.failures + 2, 10 * this.options.ttlMs);
        slot.failed = { etag: res.etag, retryAt };
        throw e;
      }
      const old = slot.current;
      slot.current = loaded;
      slot.pointerEtag = res.etag;
      this.healthy(slot);
      if (old) {
        old.retired = true;
        if (old.users === 0) this.dispose(old);
      }
      this.fitBudget(loaded);
    } catch (e) {
      // Keep serving what we have; say what went wrong in /healthz; try again after a back-off.
      slot.checkedAt = started;
      const code = e instanceof StoreAccessDeniedError || e instanceof BaseUnavailableError ? e.code : undefined;
      slot.lastError = { message: e instanceof Error ? e.message : String(e), at: started, code };
      slot.failures++;
      slot.nextCheckAt = started + this.backoff(slot.failures, this.options.ttlMs);
    }
  }

  private healthy(slot: Slot): void {
    slot.lastError = undefined;
    slot.failures = 0;
    slot.nextCheckAt = undefined;
    slot.failed = undefined;
  }

  /** 1 s, 2 s, 4 s … capped at `capMs`, each scaled by a random 0.5–1 so isolates do not retry in step. */
  private backoff(failures: number, capMs: number): number {
    return Math.min(capMs, 1000 * 2 ** (failures - 1)) * (0.5 + 0.5 * Math.random());
  }

  private async load(name: string, pointer: ModelPointer, waitUntil: (p: Promise<unknown>) => void): Promise<LoadedModel> {
    const t0 = performance.now();
    // Filling the location's cache is not on this request's path: the put finishes in the background.
    const shared = this.options.cache;
    const cache = shared && {
      get: (sha: string) => shared.get(sha),
      put: async (sha: string, bytes: Uint8Array) => waitUntil(shared.put(sha, bytes).catch(() => {})),
    };
    const { version } = pointer;
    const metadataRead = readMetadata(this.source, name, version, pointer.metadataSha256, cache);
    // A pointer that says what to fetch (`served`) lets the files and the base come beside the metadata:
    // one round trip after the pointer, not two. They are used only if the metadata, which the pointer's
    // sha256 vouches for, says exactly the same. Older pointers: the metadata first, then what it lists.
    const plan = pointer.served ? Promise.resolve(pointer.served) : metadataRead.then(servedFiles);
    const checked = metadataRead.then((metadata) => {
      if (pointer.served && !sameServed(pointer.served, servedFiles(metadata)))
        throw new Error(`its pointer (current.json) does not list the files ${version}'s metadata does; refused, not served`);
      return metadata;
    });
    const [meta, held, read] = await Promise.allSettled([
      checked,
      // A split version takes hold of its base (fetched only by the first head on it) while it fetches its head (KB).
      plan.then((p) => (p.form === "split" ? this.bases.hold(p.base.sha256, p.base.size, p.base.manifestSha256, cache) : undefined)),
      plan.then((p) => this.readModelFiles(name, version, p, cache)),
    ]);
    const base = held.status === "fulfilled" ? held.value : undefined;
    try {
      if (meta.status === "rejected") throw meta.reason;
      if (held.status === "rejected") throw held.reason;
      if (read.status === "rejected") throw read.reason;
      const metadata = meta.value;
      const split = metadata.split;
      const size = metadata.input.size;
      if (base && base.featureLayer !== metadata.base.featureLayer)
        throw new Error(`model ${name} ${version} pools ${metadata.base.featureLayer}, but its shared base is cut at ${base.featureLayer}`);
      const t1 = performance.now();
      const model = await tfl.loadLayersModel(tf.io.fromMemory(read.value));
      const t2 = performance.now();
      const layers = base ? [...(metadata.base.pooledLayers ?? []), base.featureLayer] : undefined;
      let outputs: number;
      try {
        // A head is checked on features of the width its base gives, not by running the base: a new
        // head on a warm base then costs its fetch and one tiny matmul.
        const width = base ? featureWidth(base, layers as string[]) : 0;
        if (base && width !== split?.features) throw new Error(`its shared base gives ${width} features, the head takes ${split?.features}`);
        const x = base ? tf.zeros([1, width]) : tf.zeros([1, size, size, 3]);
        const out = tf.tidy(() => model.predict(x) as tf.Tensor);
        outputs = out.shape[1] ?? 0;
        out.dataSync();
        out.dispose();
        x.dispose();
      } catch (e) {
        model.dispose();
        throw new Error(`model ${name} ${version} does not run${base ? " on its shared base" : ""}: ${e instanceof Error ? e.message : e}`);
      }
      if (outputs !== metadata.labels.length) {
        model.dispose();
        throw new Error(`model ${name} ${version} has ${outputs} outputs but ${metadata.labels.length} labels`);
      }
      const t3 = performance.now();
      return {
        name,
        pointer,
        metadata,
        model,
        base,
        layers,
        bytes: weightBytes(model),
        lastUsed: this.now(),
        loadedAt: Date.now(),
        timings: { fetchMs: t1 - t0, parseMs: t2 - t1, warmupMs: t3 - t2 },
        users: 0,
        retired: false,
      };
    } catch (e) {
      if (base) this.bases.release(base);
      throw e;
    }
  }

  /**
   * The model file (a split version's head.json, else model.json) and its weights, all fetched at once,
   * each verified against the sha256 `served` lists; model.json must name weight files that are among them.
   */
  private async readModelFiles(name: string, version: string, served: Served, cache?: VerifiedBytesCache): Promise<tf.io.ModelArtifacts> {
    const path = served.form === "split" ? SPLIT_FILES.head : ARTIFACT_FILES.model;
    if (!served.files.some((f) => f.path === path)) throw new Error(`${version} lists no ${path}`);
    const fetched = new Map(await Promise.all(served.files.map(async (f) => [f.path, await readListedFile(this.source, name, version, f, cache)] as const)));
    const json = JSON.parse(new TextDecoder().decode(fetched.get(path))) as {
      modelTopology: object;
      weightsManifest: { paths: string[]; weights: tf.io.WeightsManifestEntry[] }[];
    };
    const paths = json.weightsManifest.flatMap((g) => g.paths);
    const missing = paths.filter((p) => p === path || !fetched.has(p));
    if (missing.length > 0) throw new Error(`${path} names weight files ${missing.join(", ")} that ${version} does not list`);
    return {
      modelTopology: json.modelTopology,
      weightSpecs: json.weightsManifest.flatMap((g) => g.weights),
      weightData: concatBytes(paths.map((p) => fetched.get(p) as Uint8Array)).buffer,
    };
  }

  /**
   * Keeps the isolate's live tensors within the budget: while they exceed it, the least recently used
   * models other than `keep` are evicted (disposed now, or by their last request). What an eviction
   * frees is its weights, and its base's when it was the base's last holder.
   */
  private fitBudget(keep: LoadedModel): void {
    let excess = tf.memory().numBytes - this.options.memoryBudgetBytes;
    if (excess <= 0) return;
    const byAge = [...this.slots.values()]
      .flatMap((s) => (s.current && s.current !== keep ? [{ slot: s, model: s.current }] : []))
      .sort((a, b) => a.model.lastUsed - b.model.lastUsed);
    for (const { slot, model } of byAge) {
      if (excess <= 0) break;
      slot.current = undefined;
      excess -= model.bytes + (model.base && model.base.holders === 1 ? model.base.bytes : 0);
      model.retired = true;
      if (model.users === 0) this.dispose(model);
    }
  }
}

/** Length of the feature vector `layers` of the base give: their channels, each pooled over space. */
function featureWidth(base: LoadedBase, layers: readonly string[]): number {
  return layers.reduce((n, l) => n + ((base.model.getLayer(l).outputShape as number[]).at(-1) ?? 0), 0);
}
