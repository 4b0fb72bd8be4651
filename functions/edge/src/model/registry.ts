import * as tfl from "@tensorflow/tfjs-layers";
import { readListedFile, readMetadata, type VerifiedBytesCache } from "#shared/artifacts.ts";
import { concatBytes } from "#shared/bytes.ts";
import type { ArtifactMetadata, ModelPointer, Served } from "#shared/contracts/artifact.ts";
import { ARTIFACT_FILES, pointerSchema, SPLIT_FILES, sameServed, servedFiles } from "#shared/contracts/artifact.ts";
import { parseContractJson } from "#shared/contracts/parse.ts";
import { keys } from "#shared/keys.ts";
import { CLASS_MEANS_FILE, POOL_LAYER, readClassMeans } from "#shared/novelty.ts";
import { tf } from "../tf.ts";
import { BASE_PROBLEM, BaseUnavailableError, type LoadedBase, SharedBaseError, SharedBases, weightBytes } from "./bases.ts";
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
  /** Versions with a novelty floor: the labels' mean directions (shared/novelty.ts) and, for a whole model, a view giving its pooled features too. */
  classMeans?: Float32Array;
  probe?: tfl.LayersModel;
  /** Bytes of this model's own weights in tfjs memory (a head's, without its base). */
  bytes: number;
  lastUsed: number;
  loadedAt: number;
  timings: { fetchMs: number; parseMs: number; warmupMs: number };
  /** Served, but something about how it was found is wrong (its pointer's `served`): for /healthz. */
  warning?: string;
  /** Requests currently using this instance. */
  users: number;
  retired: boolean;
}

interface Slot {
  current?: LoadedModel;
  pointerEtag?: string;
  checkedAt: number;
  checking?: Promise<void>;
  /**
   * `code`: set when the failure has its own error code (a refused store credential). `client`: what a
   * client key is told instead of `message` (which is for operators). `base`: the shared base failure it
   * was (/healthz keeps that base's line while a head refers to it).
   */
  lastError?: { message: string; at: number; code?: "store_access_denied"; client?: string; base?: string };
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
          `Model ${name} is not available yet${slot.lastError ? `: ${slot.lastError.client ?? slot.lastError.message}` : ""}.`,
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
    model.model.dispose(); // a probe is a view on the same weights: nothing of its own to free
    if (model.base) this.bases.release(model.base);
  }

  /**
   * Makes room for new names. A model whose version failed to load (`failed`: its pointer exists, so the
   * bucket's owner bounds how many there are) keeps its back-off: otherwise asking for made-up names
   * would make the worker fetch a broken version again at once.
   */
  private forgetUnloaded(): void {
    for (const [name, s] of this.slots) if (!s.current && !s.checking && !s.failed) this.slots.delete(name);
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
        lastError: s.lastError?.message ?? s.current?.warning,
        errorCode: s.lastError?.code,
        base: s.current?.base?.key,
        bytes: s.current?.bytes,
      }));
  }

  /** The shared bases for /healthz: loaded ones, and failed ones while they back off or a model's error names them. */
  basesStatus(): ReturnType<SharedBases["status"]> {
    const referenced = new Set<string>();
    for (const s of this.slots.values()) if (s.lastError?.base) referenced.add(s.lastError.base);
    return this.bases.status(referenced);
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
      slot.lastError = {
        message: e instanceof Error ? e.message : String(e),
        at: started,
        code,
        client: e instanceof SharedBaseError ? BASE_PROBLEM : undefined,
        base: e instanceof BaseUnavailableError ? e.failure : undefined,
      };
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
    // A pointer that says what to fetch (`served`) lets the head's files (KB) come beside the metadata: one
    // round trip after the pointer, not two. They are used only if the metadata, which the pointer's sha256
    // vouches for, lists the same; else what the metadata lists is fetched. The base (megabytes, and
    // shared) is taken from the verified metadata only: for a head on a warm base that costs no fetch.
    const listed = pointer.served;
    const early = listed && this.readModelFiles(name, version, listed, cache, true);
    early?.catch(() => {}); // awaited below only if the metadata agrees
    const metadata = await metadataRead;
    const served = servedFiles(metadata);
    const agreed = listed !== undefined && sameServed(listed, served);
    const warning =
      listed && !agreed
        ? `its pointer (current.json) does not list the files ${version}'s metadata does (a writer's fault); served from the metadata's`
        : undefined;
    const [held, read] = await Promise.allSettled([
      served.form === "split" ? this.bases.hold(served.base.sha256, served.base.size, served.base.manifestSha256, cache) : undefined,
      agreed && early ? early : this.readModelFiles(name, version, served, cache, served.form === "split"),
    ]);
    const base = held.status === "fulfilled" ? held.value : undefined;
    try {
      if (held.status === "rejected") throw held.reason;
      if (read.status === "rejected") throw read.reason;
      const split = metadata.split;
      const size = metadata.input.size;
      if (base && base.featureLayer !== metadata.base.featureLayer)
        throw new Error(`model ${name} ${version} pools ${metadata.base.featureLayer}, but its shared base is cut at ${base.featureLayer}`);
      const t1 = performance.now();
      const model = await tfl.loadLayersModel(tf.io.fromMemory(read.value.artifacts));
      const t2 = performance.now();
      const layers = base ? [...(metadata.base.pooledLayers ?? []), base.featureLayer] : undefined;
      let novelty: Pick<LoadedModel, "classMeans" | "probe"> = {};
      try {
        novelty = noveltyOf(metadata, model, read.value.classMeans, base ? split?.features : undefined);
      } catch (e) {
        model.dispose();
        throw new Error(`model ${name} ${version}'s novelty rule cannot be used: ${e instanceof Error ? e.message : e}`);
      }
      let outputs: number;
      try {
        // A head is checked on features of the width its base gives, not by running the base: a new
        // head on a warm base then costs its fetch and one tiny matmul.
        const width = base ? featureWidth(base, layers as string[]) : 0;
        if (base && width !== split?.features) throw new Error(`its shared base gives ${width} features, the head takes ${split?.features}`);
        const x = base ? tf.zeros([1, width]) : tf.zeros([1, size, size, 3]);
        // Through the probe where there is one: what requests run is what gets warmed up.
        const out = tf.tidy(() => (novelty.probe ? (novelty.probe.predict(x) as tf.Tensor[])[1] : model.predict(x)) as tf.Tensor);
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
        ...novelty,
        // The directions live on the JS heap, beside the tensors: counted with them.
        bytes: weightBytes(model) + (novelty.classMeans?.byteLength ?? 0),
        lastUsed: this.now(),
        loadedAt: Date.now(),
        timings: { fetchMs: t1 - t0, parseMs: t2 - t1, warmupMs: t3 - t2 },
        warning,
        users: 0,
        retired: false,
      };
    } catch (e) {
      if (base) this.bases.release(base);
      throw e;
    }
  }

  /**
   * The model file (a split version's head.json, else model.json) and the weights it names, each verified
   * against the sha256 and size `served` lists. `beside`: the other listed files are fetched at once with
   * the model file (one round trip; for a pointer's listing, capped by its schema, and a split version's
   * single head shard); else only once the model file names them, so nothing it does not name is fetched —
   * but the novelty rule's class-means.bin, which no model file names: it is fetched beside the model file when listed.
   */
  private async readModelFiles(
    name: string,
    version: string,
    served: Served,
    cache: VerifiedBytesCache | undefined,
    beside: boolean,
  ): Promise<{ artifacts: tf.io.ModelArtifacts; classMeans?: Uint8Array }> {
    const path = served.form === "split" ? SPLIT_FILES.head : ARTIFACT_FILES.model;
    const listing = new Map(served.files.map((f) => [f.path, f]));
    const modelFile = listing.get(path);
    if (!modelFile) throw new Error(`${version} lists no ${path}`);
    const read = (f: Served["files"][number]) => readListedFile(this.source, name, version, f, cache);
    const early = new Map(beside ? served.files.filter((f) => f !== modelFile).map((f) => [f.path, read(f)] as const) : []);
    // The novelty rule's file is not named by the model file: it is read at once, beside it.
    const means = listing.get(CLASS_MEANS_FILE);
    if (means && !early.has(CLASS_MEANS_FILE)) early.set(CLASS_MEANS_FILE, read(means));
    for (const p of early.values()) p.catch(() => {}); // each awaited below if the model file names it
    const json = JSON.parse(new TextDecoder().decode(await read(modelFile))) as {
      modelTopology: object;
      weightsManifest: { paths: string[]; weights: tf.io.WeightsManifestEntry[] }[];
    };
    const paths = json.weightsManifest.flatMap((g) => g.paths);
    const missing = paths.filter((p) => p === path || !listing.has(p));
    if (missing.length > 0) throw new Error(`${path} names weight files ${missing.join(", ")} that ${version} does not list`);
    const shards = await Promise.all(paths.map((p) => early.get(p) ?? read(listing.get(p) as Served["files"][number])));
    const classMeans = await early.get(CLASS_MEANS_FILE);
    return {
      artifacts: { modelTopology: json.modelTopology, weightSpecs: json.weightsManifest.flatMap((g) => g.weights), weightData: concatBytes(shards).buffer },
      ...(classMeans ? { classMeans } : {}),
    };
  }

  /**
   * Keeps the isolate's live tensors within the budget: while they exceed it, the least recently used
   * models other than `keep` are evicted (disposed now, or by their last request). What an eviction
   * frees is its weights, and its base's when it was the base's last holder.
   */
  private fitBudget(keep: LoadedModel): void {
    // Tensors, and the novelty rule's directions (JS arrays beside them: about a head's size each).
    const directions = [...this.slots.values()].reduce((n, s) => n + (s.current?.classMeans?.byteLength ?? 0), 0);
    let excess = tf.memory().numBytes + directions - this.options.memoryBudgetBytes;
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

/**
 * What the novelty rule needs of a loaded version (none for a version without one): its directions,
 * checked against the metadata and the features the model gives (a split head's input width, else the
 * whole model's pooling layer, through a view that outputs it beside the scores).
 */
function noveltyOf(
  metadata: ArtifactMetadata,
  model: tfl.LayersModel,
  bytes: Uint8Array | undefined,
  headWidth: number | undefined,
): Pick<LoadedModel, "classMeans" | "probe"> {
  const n = metadata.novelty;
  if (!n) return {};
  if (!bytes) throw new Error(`it lists no ${CLASS_MEANS_FILE}`);
  const classMeans = readClassMeans(bytes, n.rows, n.features);
  if (headWidth !== undefined) {
    if (headWidth !== n.features) throw new Error(`its head takes ${headWidth} features, its directions have ${n.features}`);
    return { classMeans };
  }
  const pool = model.getLayer(POOL_LAYER).output as tfl.SymbolicTensor;
  if (pool.shape.at(-1) !== n.features) throw new Error(`its pooled features are ${pool.shape.at(-1)} wide, its directions ${n.features}`);
  return { classMeans, probe: tfl.model({ inputs: model.inputs, outputs: [pool, model.outputs[0] as tfl.SymbolicTensor] }) };
}

/** Length of the feature vector `layers` of the base give: their channels, each pooled over space. */
function featureWidth(base: LoadedBase, layers: readonly string[]): number {
  return layers.reduce((n, l) => n + ((base.model.getLayer(l).outputShape as number[]).at(-1) ?? 0), 0);
}
