import * as tf from "@tensorflow/tfjs";
import { pMapIterable } from "p-map";
import type { BaseMetadata } from "#shared/contracts/base.ts";
import { sha256Hex } from "#shared/hash.ts";
import { inputHash } from "#shared/image/input-hash.ts";
import { keys } from "#shared/keys.ts";
import { LATEST_PREPROCESSING, type Pixels, type PreprocessingSpec, preprocess } from "#shared/preprocess.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import type { TrainOptions } from "../config.ts";
import { augmentation } from "../dataset/augment.ts";
import { decodeImage } from "../dataset/decode.ts";
import type { DatasetImage } from "../dataset/read.ts";
import { poolsOf } from "../model/bases.ts";
import { poolMaps } from "../model/graph.ts";
import { roundToHalf } from "../model/weights.ts";
import { createForwardPool, lazyForwardPool } from "./forward-pool.ts";
import { decodePack, decodePackHeader, encodePack, type Pack, type PackHeader } from "./packs.ts";
import type { ForwardPool } from "./worker-pool.ts";

/**
 * Features of every image, computed once. The cache key covers everything that changes the numbers
 * (base weights, cut layer, pooling, size, preprocessing, augmentation recipe and seed); the entries
 * are keyed by image content. A retrain reads the packs, fetches only images it has not seen and
 * writes their features as new packs, which also checkpoints a long extraction as it goes.
 *
 * The pipeline streams: while the forward pass of one batch runs (on every core, see forward-pool.ts),
 * the next images are fetched, decoded (sharp, on libuv threads) and preprocessed (see streamPacks).
 */
export interface ExtractorSpec {
  baseSha256: string;
  layer: string;
  /**
   * Mid-level layers pooled too, their vectors concatenated before the feature layer's (features from
   * several layers, see bases.ts). Absent for one layer.
   */
  pooledLayers?: readonly string[];
  pooled: boolean;
  size: number;
  preprocessing: PreprocessingSpec;
  views: number;
  seed: number;
}

/**
 * What the frozen features of a run are made of: the preprocessing the base expects and the extractor
 * spec (which is also the cache key of the feature packs). Shared by training and `embedShard`, so an
 * array job's packs are the ones training looks for.
 */
export function featureSpec(base: BaseMetadata, options: TrainOptions): { preprocessing: PreprocessingSpec; pooledSpec: ExtractorSpec } {
  const extraLayers = poolsOf(base);
  const preprocessing: PreprocessingSpec = {
    version: LATEST_PREPROCESSING,
    fit: "center-crop",
    normalization: base.normalization,
    background: [255, 255, 255],
  };
  return {
    preprocessing,
    pooledSpec: {
      baseSha256: base.sha256,
      layer: base.featureLayer,
      // Fine-tuning retrains the blocks above its cut and pools only their output: the head it starts
      // from is trained on that layer's features alone.
      ...(options.strategy === "head" && extraLayers.length > 0 ? { pooledLayers: extraLayers } : {}),
      pooled: true,
      size: options.imageSize,
      preprocessing,
      views: options.views,
      seed: options.seed,
    },
  };
}

/**
 * The layers a spec's features come from, in the order their pooled vectors are concatenated (the
 * feature layer last). Training's extractor and the exported classifier both follow it.
 */
export function pooledLayersOf(spec: Pick<ExtractorSpec, "layer" | "pooledLayers">): string[] {
  return [...(spec.pooledLayers ?? []), spec.layer];
}

/**
 * The frozen model that computes a spec's features: the base up to its feature layer (maps, pooled by
 * the engine), or with `pooledLayers` each layer pooled and all concatenated into one vector.
 */
export function extractorFor(model: tf.LayersModel, spec: Pick<ExtractorSpec, "layer" | "pooledLayers">): tf.LayersModel {
  const layers = pooledLayersOf(spec);
  if (layers.length === 1) return tf.model({ inputs: model.inputs, outputs: model.getLayer(spec.layer).output as tf.SymbolicTensor });
  return tf.model({
    inputs: model.inputs,
    outputs: poolMaps(
      layers.map((l) => model.getLayer(l).output as tf.SymbolicTensor),
      "pool",
    ),
  });
}

export interface Features {
  shape: number[];
  /** id → one array per view (view 0 first). */
  byId: Map<string, Float32Array[]>;
  failed: Map<string, { key: string; reason: string }>;
  /** id → dHash of the image's view-0 input, where its pack recorded one (near-duplicate checks). */
  hashes: Map<string, string>;
  /**
   * With `retain: false`: where the values are — pack key → its entries ([image id, view], in the order
   * of the values) — for training to stream them (fit/rows.ts) without reading every pack again.
   */
  packs: Map<string, [string, number][]>;
  stats: {
    cached: number;
    computed: number;
    failed: number;
    packsRead: number;
    packsWritten: number;
    seconds: number;
    /** What computed the new features ("onnxruntime", "tfjs-wasm"…), when any were computed. */
    engine?: string;
    /** Why ONNX Runtime was not used where it would have been. */
    engineFallback?: string;
  };
}

/** Images per pack (and so per checkpoint). EDGETUNE_PACK_IMAGES overrides it, for tests of resuming. */
export const PACK_IMAGES = Number(process.env.EDGETUNE_PACK_IMAGES) || 256;
/** Packs stay well below a single PUT's comfortable size (unpooled fine-tuning maps are large). */
export const PACK_MAX_BYTES = 8 * 1024 * 1024;
const FETCH_CONCURRENCY = 8;
const BATCH = 32;

export async function cacheKeyOf(spec: ExtractorSpec): Promise<string> {
  // `views` is not part of the key: entries are per (image, view), so a run that wants fewer views
  // reuses the packs of one that wanted more.
  const { views: _views, ...identity } = spec;
  // Unpooled maps (fine-tuning) are streamed from their packs: packs written label by label, as before
  // "packOrder", would make label-pure batches, so those caches are not reused.
  const order = spec.pooled ? {} : { packOrder: "content-hash" };
  // weights: the base's folded weights rounded to float16, as served (model/bases.ts loadBase).
  return (await sha256Hex(JSON.stringify({ v: 1, ...identity, ...order, augment: "crop-flip-v1", weights: "float16" }))).slice(0, 24);
}

export async function extractFeatures(
  store: ObjectStore,
  extractor: tf.LayersModel,
  spec: ExtractorSpec,
  images: readonly DatasetImage[],
  onProgress: (done: number, total: number) => void = () => {},
  options: {
    threads?: number;
    pool?: ForwardPool;
    /** Sees what is left to compute; returns true if it had it computed elsewhere (fan-out.ts), so the cache is read again. */
    beforeCompute?: (todo: readonly DatasetImage[]) => Promise<boolean>;
    /**
     * false: only note which images have features (`byId` holds empty arrays) and leave the values in
     * their packs, for training to stream (fit/rows.ts): fine-tuning's bottom maps do not fit in memory.
     */
    retain?: boolean;
  } = {},
): Promise<Features> {
  const retain = options.retain ?? true;
  const started = performance.now();
  const prefix = keys.embeddingCache(await cacheKeyOf(spec));
  let features = await readCache(store, prefix, retain);
  let todo = uniqueById(images.filter((image) => !isComplete(features, image.id, spec.views)));
  if (todo.length > 0 && (await options.beforeCompute?.(todo))) {
    features = await readCache(store, prefix, retain);
    todo = uniqueById(images.filter((image) => !isComplete(features, image.id, spec.views)));
  }
  // In content-hash order, not key order (which is label by label): every pack then mixes labels, so
  // fine-tuning's shuffle buffer of a few packs (fit/rows.ts) draws batches from all of them.
  todo.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  const cached = images.length - todo.length;
  let computed = 0;
  let packsWritten = 0;
  let engine: string | undefined;
  let engineFallback: string | undefined;
  onProgress(cached, images.length);

  if (todo.length > 0) {
    // A pool handed in belongs to the caller (it may serve several calls); one made here is closed here.
    const pool = options.pool ?? (await createForwardPool(extractor, { size: spec.size, pooled: spec.pooled, threads: options.threads }));
    try {
      let done = cached;
      await pool.ready?.(); // a lazy pool: its thread count and engine are known from here
      await streamPacks(store, prefix, pool, spec, todo, imagesPerPack(extractor, spec), (pack, key) => {
        addPack(features, pack, retain);
        if (!retain) features.packs.set(key, entriesOf(pack));
        packsWritten++;
        computed += pack.entries.length / spec.views;
        done += pack.entries.length / spec.views + pack.failed.length;
        onProgress(done, images.length);
      });
      engine = pool.engine;
      engineFallback = pool.fallback;
    } finally {
      if (!options.pool) await pool.close();
    }
  }
  return {
    ...features,
    stats: {
      cached,
      computed,
      failed: images.filter((i) => features.failed.has(i.id)).length,
      packsRead: features.packsRead,
      packsWritten,
      seconds: (performance.now() - started) / 1000,
      ...(engine ? { engine } : {}),
      ...(engineFallback ? { engineFallback } : {}),
    },
  };
}

/**
 * The features of a run's training images (every view) and held-out images (view 0 only, as served),
 * on one worker pool started on demand, merged. Used by training (pooled features, and the bottom maps
 * of fine-tuning) and by every array-job child, so all of them read and write the same packs.
 */
export async function extractSplits(
  store: ObjectStore,
  extractor: tf.LayersModel,
  spec: ExtractorSpec,
  images: { train: readonly DatasetImage[]; heldOut: readonly DatasetImage[] },
  onProgress: (split: "train" | "held-out", done: number, total: number) => void,
  options: { beforeCompute?: (todo: readonly DatasetImage[]) => Promise<boolean>; retain?: boolean } = {},
): Promise<Features> {
  const pool = lazyForwardPool(extractor, { size: spec.size, pooled: spec.pooled });
  try {
    const train = await extractFeatures(store, extractor, spec, images.train, (d, t) => onProgress("train", d, t), { pool, ...options });
    const heldOut = await extractFeatures(store, extractor, { ...spec, views: 1 }, images.heldOut, (d, t) => onProgress("held-out", d, t), {
      pool,
      retain: options.retain,
    });
    return mergeFeatures(train, heldOut);
  } finally {
    await pool.close();
  }
}

function mergeFeatures(a: Features, b: Features): Features {
  const byId = new Map(a.byId);
  for (const [k, v] of b.byId) if (!byId.has(k)) byId.set(k, v);
  return {
    shape: a.shape.length > 0 ? a.shape : b.shape,
    byId,
    failed: new Map([...a.failed, ...b.failed]),
    hashes: new Map([...a.hashes, ...b.hashes]),
    packs: new Map([...a.packs, ...b.packs]),
    stats: {
      cached: a.stats.cached + b.stats.cached,
      computed: a.stats.computed + b.stats.computed,
      failed: a.stats.failed + b.stats.failed,
      packsRead: a.stats.packsRead + b.stats.packsRead,
      packsWritten: a.stats.packsWritten + b.stats.packsWritten,
      seconds: a.stats.seconds + b.stats.seconds,
      ...((a.stats.engine ?? b.stats.engine) ? { engine: a.stats.engine ?? b.stats.engine } : {}),
      ...((a.stats.engineFallback ?? b.stats.engineFallback) ? { engineFallback: a.stats.engineFallback ?? b.stats.engineFallback } : {}),
    },
  };
}

type CacheState = Omit<Features, "stats"> & { packsRead: number };

async function readCache(store: ObjectStore, prefix: string, retain: boolean): Promise<CacheState> {
  const state: CacheState = { shape: [], byId: new Map(), failed: new Map(), hashes: new Map(), packs: new Map(), packsRead: 0 };
  const keysToRead: string[] = [];
  for await (const o of store.list(prefix)) keysToRead.push(o.key);
  // A large dataset has hundreds of packs: read them FETCH_CONCURRENCY at a time, apply them in order.
  const read = async (key: string) => {
    const bytes = await store.get(key);
    if (!bytes) return undefined;
    try {
      return { key, pack: retain ? decodePack(bytes) : headerOnly(decodePackHeader(bytes)) };
    } catch {
      return undefined; // a torn pack from a killed run: its images are simply computed again
    }
  };
  for await (const found of pMapIterable(keysToRead, read, { concurrency: FETCH_CONCURRENCY })) {
    if (!found) continue;
    state.packsRead++;
    addPack(state, found.pack, retain);
    if (!retain) state.packs.set(found.key, entriesOf(found.pack));
  }
  return state;
}

const NOT_RETAINED = new Float32Array(0);

const entriesOf = (pack: Pack): [string, number][] => pack.entries.map((e) => [e.id, e.view]);

/** A pack without its values: what `retain: false` needs to know. */
function headerOnly(h: PackHeader): Pack {
  return { shape: h.shape, entries: h.entries.map(([id, view]) => ({ id, view, values: NOT_RETAINED })), failed: h.failed, hashes: h.hashes };
}

function addPack(state: Pick<CacheState, "shape" | "byId" | "failed" | "hashes">, pack: Pack, retain: boolean): void {
  if (pack.shape.length > 0) state.shape = pack.shape;
  for (const e of pack.entries) {
    const views = state.byId.get(e.id) ?? [];
    views[e.view] = retain ? e.values : NOT_RETAINED;
    state.byId.set(e.id, views);
  }
  for (const f of pack.failed) state.failed.set(f.id, { key: f.key, reason: f.reason });
  for (const [id, hash] of Object.entries(pack.hashes ?? {})) state.hashes.set(id, hash);
}

function isComplete(state: CacheState, id: string, views: number): boolean {
  if (state.failed.has(id)) return true;
  const have = state.byId.get(id);
  return have !== undefined && have.length >= views && have.slice(0, views).every(Boolean);
}

function uniqueById(images: DatasetImage[]): DatasetImage[] {
  const seen = new Map<string, DatasetImage>();
  for (const image of images) if (!seen.has(image.id)) seen.set(image.id, image);
  return [...seen.values()];
}

function imagesPerPack(extractor: tf.LayersModel, spec: ExtractorSpec): number {
  const shape = (extractor.outputs[0]?.shape ?? []).slice(1).map((d) => d ?? 1);
  const values = spec.pooled ? (shape.at(-1) ?? 1) : shape.reduce((a, b) => a * b, 1);
  const bytesPerImage = values * 2 * spec.views;
  return Math.max(1, Math.min(PACK_IMAGES, Math.floor(PACK_MAX_BYTES / bytesPerImage)));
}

interface LoadedImage {
  image: DatasetImage;
  pixels?: Pixels;
  error?: string;
}

/** Batches waiting for or running on the pool, beyond one per thread: keeps every thread fed. */
const QUEUED_BATCHES = 1;

/**
 * The pipeline: images are fetched and decoded a few at a time, ahead of the forward pass, and their
 * views preprocessed straight into the batch being filled; every full batch goes to the pool at once;
 * a pack is written (and reported) when all of its batches are back, while the next pack's images
 * are already being computed. There is no barrier between packs, so the cores stay busy from the
 * first batch to the last, and memory stays bounded (FETCH_CONCURRENCY decoded images plus
 * threads + QUEUED_BATCHES + 1 batches).
 */
async function streamPacks(
  store: ObjectStore,
  prefix: string,
  pool: ForwardPool,
  spec: ExtractorSpec,
  todo: DatasetImage[],
  perPack: number,
  onPack: (pack: Pack, key: string) => void,
): Promise<void> {
  const slots = semaphore(pool.threads + QUEUED_BATCHES);
  const packDone: Promise<void>[] = [];
  let failure: unknown;
  let pack: Pack = { shape: [], entries: [], failed: [], hashes: {} };
  let packImages = 0;
  let batches: Promise<void>[] = [];
  // Views are preprocessed straight into the batch being filled (no per-view arrays, no copy).
  const perRow = spec.size * spec.size * 3;
  // Batch buffers (19 MB at 224 px) that the pool handed back, to fill again instead of allocating.
  const spare: Float32Array[] = [];
  const newBody = () => spare.pop() ?? new Float32Array(BATCH * perRow);
  let body = newBody();
  let rows: { id: string; view: number }[] = [];

  const sendBatch = async () => {
    if (rows.length === 0) return;
    const batch = rows;
    const full = batch.length === BATCH;
    const data = full ? body : body.slice(0, batch.length * perRow);
    rows = [];
    if (full) body = newBody(); // the full one is handed (transferred) to the pool; a partial one was copied
    await slots.acquire();
    const target = pack;
    const computed = pool
      .run(data, batch.length)
      .then((out) => {
        if (out.input?.length === BATCH * perRow) spare.push(out.input);
        target.shape = out.shape;
        // Rounded to float16 now, as the pack stores them: a run that reads them back from the cache
        // (a resumed or repeated run) trains on exactly the same numbers as the one that computed them.
        batch.forEach((r, i) => {
          target.entries.push({ id: r.id, view: r.view, values: roundToHalf(out.values[i] as Float32Array) });
        });
      })
      .finally(slots.release);
    // Noted at once (and so never an unhandled rejection): the loop below stops feeding the pool.
    computed.catch((e: unknown) => {
      failure ??= e;
    });
    batches.push(computed);
  };
  const closePack = async () => {
    await sendBatch();
    const finished = pack;
    const done = Promise.all(batches).then(async () => {
      // Batches come back in any order; a pack's bytes should not depend on it.
      finished.entries.sort((a, b) => (a.id === b.id ? a.view - b.view : a.id < b.id ? -1 : 1));
      onPack(finished, await writePack(store, prefix, finished));
    });
    done.catch((e: unknown) => {
      failure ??= e; // surfaced below; the handler also keeps it from being an unhandled rejection
    });
    packDone.push(done);
    pack = { shape: [], entries: [], failed: [], hashes: {} };
    packImages = 0;
    batches = [];
  };

  for await (const l of pMapIterable(todo, (image) => loadImage(store, image), { concurrency: FETCH_CONCURRENCY })) {
    if (failure) break;
    if (l.pixels) {
      for (let view = 0; view < spec.views; view++) {
        const into = { data: body, offset: rows.length * perRow };
        preprocess(l.pixels, spec.size, spec.preprocessing, { ...augmentation(l.pixels, view, spec.seed, l.image.id), into });
        // View 0 is the image as served (no augmentation): its hash finds near-duplicates across the split.
        if (view === 0) (pack.hashes as Record<string, string>)[l.image.id] = inputHash(body, into.offset, spec.size);
        rows.push({ id: l.image.id, view });
        if (rows.length === BATCH) await sendBatch();
      }
    } else pack.failed.push({ id: l.image.id, key: l.image.key, reason: l.error ?? "unknown error" });
    packImages++;
    if (packImages === perPack) await closePack();
  }
  if (packImages > 0) await closePack();
  await Promise.allSettled(packDone);
  if (failure) throw failure;
}

/**
 * Fetches and decodes one image (sharp decodes off this thread); the pipeline runs FETCH_CONCURRENCY
 * of these ahead, in order, so packs hold the same images run after run. A failure is returned with
 * its reason, never thrown.
 */
async function loadImage(store: ObjectStore, image: DatasetImage): Promise<LoadedImage> {
  try {
    const bytes = await store.get(image.key);
    if (!bytes) throw new Error("deleted while training");
    return { image, pixels: await decodeImage(bytes) };
  } catch (e) {
    return { image, error: e instanceof Error ? e.message : String(e) };
  }
}

/** A counting semaphore: `acquire` waits while `n` holders are out. */
function semaphore(n: number): { acquire: () => Promise<void>; release: () => void } {
  let free = n;
  const waiting: (() => void)[] = [];
  return {
    acquire: () =>
      new Promise<void>((resolve) => {
        if (free > 0) {
          free--;
          resolve();
        } else waiting.push(resolve);
      }),
    release: () => {
      const next = waiting.shift();
      if (next) next();
      else free++;
    },
  };
}

/** Writes the pack under a name made of its contents; returns its key. */
async function writePack(store: ObjectStore, prefix: string, pack: Pack): Promise<string> {
  const ids = [...pack.entries.map((e) => `${e.id}/${e.view}`), ...pack.failed.map((f) => f.id)].sort();
  const name = (await sha256Hex(ids.join("\n"))).slice(0, 20);
  const key = `${prefix}${name}.bin`;
  await store.put(key, encodePack(pack));
  return key;
}
