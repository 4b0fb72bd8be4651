import * as tfl from "@tensorflow/tfjs-layers";
import { readSharedBase, type VerifiedBytesCache } from "#shared/artifacts.ts";
import { concatBytes } from "#shared/bytes.ts";
import { tf } from "../tf.ts";
import type { ModelSource } from "./source.ts";

/**
 * The shared bases this isolate holds: one copy per (base sha256, size), however many heads use it
 * (ARCHITECTURE.md "One base, many models"). A base is loaded, every byte verified, when the first head
 * that names it loads, and disposed when the last head instance holding it is disposed. Content
 * addressed: a base never changes, so there is no hot swap here (heads swap; a new base is a new key).
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

/** Bytes a model's weights hold in tfjs memory (each float32: 4 bytes). */
export function weightBytes(model: tfl.LayersModel): number {
  return model.weights.reduce((n, w) => n + w.read().size * 4, 0);
}

export class SharedBases {
  private readonly loaded = new Map<string, LoadedBase>();
  private readonly loading = new Map<string, Promise<LoadedBase>>();
  /** The last failure of a base that is not loaded, for /healthz. */
  private readonly errors = new Map<string, { message: string; at: number }>();
  private readonly source: ModelSource;

  constructor(source: ModelSource) {
    this.source = source;
  }

  /** The base, loaded once however many heads ask for it at the same time; the caller then holds it (`release` when done). */
  async hold(sha256: string, size: number, manifestSha256: string, cache?: VerifiedBytesCache): Promise<LoadedBase> {
    const key = baseKey(sha256, size);
    let base = this.loaded.get(key);
    if (!base) {
      let pending = this.loading.get(key);
      if (!pending) {
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

  status(): { sha256: string; size: number; featureLayer?: string; heads: number; bytes?: number; loadedAt?: string; problem?: string }[] {
    const loaded = [...this.loaded.values()].map((b) => ({
      sha256: b.sha256,
      size: b.size,
      featureLayer: b.featureLayer,
      heads: b.holders,
      bytes: b.bytes,
      loadedAt: new Date(b.loadedAt).toISOString(),
    }));
    const failed = [...this.errors.entries()]
      .filter(([key]) => !this.loaded.has(key))
      .map(([key, e]) => {
        const [sha256, size] = key.split("-");
        return { sha256: sha256 as string, size: Number(size), heads: 0, problem: e.message };
      });
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
      this.errors.delete(key);
      return base;
    } catch (e) {
      // Kept for /healthz; the error itself goes on to the head's slot (with its code, if it has one).
      this.errors.set(key, { message: e instanceof Error ? e.message : String(e), at: Date.now() });
      throw e;
    }
  }
}
