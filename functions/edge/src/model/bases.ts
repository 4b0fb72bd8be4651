import * as tfl from "@tensorflow/tfjs-layers";
import { readSharedBase, type VerifiedBytesCache } from "#shared/artifacts.ts";
import { concatBytes } from "#shared/bytes.ts";
import { tf } from "../tf.ts";
import { type ModelSource, StoreAccessDeniedError } from "./source.ts";

/**
 * The shared bases this isolate holds: one copy per (base sha256, size), however many heads use it
 * (ARCHITECTURE.md "One base, many models"). A base is loaded, every byte verified, when the first head
 * that names it loads, and disposed when the last head instance holding it is disposed. Content
 * addressed: a base never changes, so there is no hot swap here (heads swap; a new base is a new key).
 * A base that fails to load backs off once for every head on it: until its retry time, a head that
 * needs it is refused at once (BaseUnavailableError) and storage is not asked again; then the first
 * head that asks retries it, for all of them.
 */
export interface LoadedBase {
  key: string;
  sha256: string;
  size: number;
  /** sha256 of the base.json it was verified against. */
  manifestSha256: string;
  featureLayer: string;
  model: tfl.LayersModel;
  /** Bytes of the base's weights in tfjs memory. */
  bytes: number;
  loadedAt: number;
  timings: { fetchMs: number; parseMs: number; warmupMs: number };
  /** Head instances holding this base (loaded, serving or retired but still in use). */
  holders: number;
  /** Multi-output views on the base, by the layers they output: no weights of their own. */
  extractors: Map<string, tfl.LayersModel>;
}

export const baseKey = (sha256: string, size: number) => `${sha256}-${size}`;

/**
 * A head cannot load because its shared base cannot: the base's problem, not the head's version (the
 * registry retries the head when the base may be tried again, `retryAt`). `code`: the base's failure had
 * its own error code (a refused store credential).
 */
export class BaseUnavailableError extends Error {
  readonly retryAt: number;
  readonly code?: "store_access_denied";
  constructor(key: string, cause: string, retryAt: number, code?: "store_access_denied") {
    super(`its shared base ${key} cannot be loaded: ${cause}`);
    this.retryAt = retryAt;
    this.code = code;
  }
}

interface BaseFailure {
  sha256: string;
  size: number;
  message: string;
  code?: "store_access_denied";
  at: number;
  /** Failures in a row, and when the base may be fetched again. */
  failures: number;
  retryAt: number;
}

export interface SharedBasesOptions {
  /** Caps the back-off of a base that fails (10 × this, as a head's version). */
  ttlMs: number;
  now?: () => number;
}

/** Bytes a model's weights hold in tfjs memory (each float32: 4 bytes). */
export function weightBytes(model: tfl.LayersModel): number {
  return model.weights.reduce((n, w) => n + w.read().size * 4, 0);
}

export class SharedBases {
  private readonly loaded = new Map<string, LoadedBase>();
  private readonly loading = new Map<string, Promise<LoadedBase>>();
  /**
   * The last failure of a base that is not loaded, for its back-off and /healthz. Keyed by the base and
   * the base.json sha256 heads name: a head naming a wrong one (failing for itself) backs off alone, not
   * the heads that name the right one.
   */
  private readonly errors = new Map<string, BaseFailure>();
  private readonly source: ModelSource;
  private readonly options: SharedBasesOptions;

  constructor(source: ModelSource, options: SharedBasesOptions) {
    this.source = source;
    this.options = options;
  }

  private now(): number {
    return this.options.now?.() ?? Date.now();
  }

  /**
   * The base, loaded once however many heads ask for it at the same time; the caller then holds it
   * (`release` when done). Throws BaseUnavailableError while a failed base backs off, and when it fails.
   */
  async hold(sha256: string, size: number, manifestSha256: string, cache?: VerifiedBytesCache): Promise<LoadedBase> {
    const key = baseKey(sha256, size);
    let base = this.loaded.get(key);
    if (!base) {
      let pending = this.loading.get(key);
      if (!pending) {
        const failed = this.errors.get(`${key}@${manifestSha256}`);
        if (failed && failed.retryAt > this.now()) throw new BaseUnavailableError(key, failed.message, failed.retryAt, failed.code);
        pending = this.load(key, sha256, size, manifestSha256, cache).finally(() => this.loading.delete(key));
        this.loading.set(key, pending);
      }
      base = await pending;
    }
    // The key is the base's content and size, so one base.json ever sits there: a head naming another
    // was published against bytes that are not these (or its metadata was altered). Refused, not mixed.
    if (base.manifestSha256 !== manifestSha256)
      throw new Error(
        `the head names shared base ${key} with base.json ${manifestSha256.slice(0, 12)}…, but that base is ${base.manifestSha256.slice(0, 12)}…`,
      );
    base.holders++;
    return base;
  }

  release(base: LoadedBase): void {
    base.holders--;
    if (base.holders > 0) return;
    this.loaded.delete(base.key);
    base.model.dispose();
  }

  get(key: string): LoadedBase | undefined {
    return this.loaded.get(key);
  }

  status(): {
    sha256: string;
    size: number;
    featureLayer?: string;
    heads: number;
    bytes?: number;
    loadedAt?: string;
    problem?: string;
    failures?: number;
    retryAt?: string;
  }[] {
    const loaded = [...this.loaded.values()].map((b) => ({
      sha256: b.sha256,
      size: b.size,
      featureLayer: b.featureLayer,
      heads: b.holders,
      bytes: b.bytes,
      loadedAt: new Date(b.loadedAt).toISOString(),
    }));
    const failed = [...this.errors.values()]
      .filter((e) => !this.loaded.has(baseKey(e.sha256, e.size)))
      .map((e) => ({
        sha256: e.sha256,
        size: e.size,
        heads: 0,
        problem: e.message,
        failures: e.failures,
        retryAt: new Date(Date.now() + (e.retryAt - this.now())).toISOString(),
      }));
    return [...loaded, ...failed];
  }

  private async load(key: string, sha256: string, size: number, manifestSha256: string, cache?: VerifiedBytesCache): Promise<LoadedBase> {
    try {
      const t0 = performance.now();
      const { manifest, files } = await readSharedBase(this.source, sha256, size, manifestSha256, cache);
      const modelJson = JSON.parse(new TextDecoder().decode(files.get("model.json"))) as {
        modelTopology: object;
        weightsManifest: { paths: string[]; weights: tf.io.WeightsManifestEntry[] }[];
      };
      const shards = modelJson.weightsManifest.flatMap((g) => g.paths).map((p) => files.get(p));
      if (shards.some((s) => s === undefined)) throw new Error(`shared base ${key} lists weight shards its base.json does not`);
      const t1 = performance.now();
      const model = await tfl.loadLayersModel(
        tf.io.fromMemory({
          modelTopology: modelJson.modelTopology,
          weightSpecs: modelJson.weightsManifest.flatMap((g) => g.weights),
          weightData: concatBytes(shards as Uint8Array[]).buffer,
        }),
      );
      const t2 = performance.now();
      // The first inference is slower (kernels set up): pay it here, not in a request.
      tf.tidy(() => (model.predict(tf.zeros([1, size, size, 3])) as tf.Tensor).dataSync());
      const t3 = performance.now();
      const base: LoadedBase = {
        key,
        sha256,
        size,
        manifestSha256,
        featureLayer: manifest.base.featureLayer,
        model,
        bytes: weightBytes(model),
        loadedAt: Date.now(),
        timings: { fetchMs: t1 - t0, parseMs: t2 - t1, warmupMs: t3 - t2 },
        holders: 0,
        extractors: new Map(),
      };
      this.loaded.set(key, base);
      for (const k of this.errors.keys()) if (k.startsWith(`${key}@`)) this.errors.delete(k);
      return base;
    } catch (e) {
      // One back-off for the base, whatever number of heads wait for it; the head's slot gets the message (and code).
      const at = this.now();
      const errorKey = `${key}@${manifestSha256}`;
      const failures = (this.errors.get(errorKey)?.failures ?? 0) + 1;
      // As a head's version: 2–4 s, then 4–8 s, … up to 10 TTLs (a base is megabytes; jittered so isolates do not retry in step).
      const retryAt = at + Math.min(10 * this.options.ttlMs, 1000 * 2 ** (failures + 1)) * (0.5 + 0.5 * Math.random());
      const message = e instanceof Error ? e.message : String(e);
      const code = e instanceof StoreAccessDeniedError ? e.code : undefined;
      this.errors.delete(errorKey);
      // Bounded like the registry's slots: heads naming made-up base.json files cannot grow memory.
      if (this.errors.size >= 64) this.errors.delete(this.errors.keys().next().value as string);
      this.errors.set(errorKey, { sha256, size, message, code, at, failures, retryAt });
      throw new BaseUnavailableError(key, message, retryAt, code);
    }
  }
}
