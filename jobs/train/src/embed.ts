import * as tf from "@tensorflow/tfjs";
import { sha256Hex } from "../../../shared/hash.ts";
import { keys } from "../../../shared/keys.ts";
import { type PreprocessingSpec, preprocess } from "../../../shared/preprocess.ts";
import type { ObjectStore } from "../../../shared/s3/store.ts";
import { augmentation } from "./augment.ts";
import type { DatasetImage } from "./dataset.ts";
import { decodeImage } from "./decode.ts";
import { decodePack, encodePack, type Pack, type PackEntry } from "./packs.ts";

/**
 * Features of every image, computed once. The cache key covers everything that changes the numbers
 * (base weights, cut layer, pooling, size, preprocessing, augmentation recipe and seed); the entries
 * are keyed by image content. A retrain reads the packs, fetches only images it has not seen and
 * writes their features as new packs, which also checkpoints a long extraction as it goes.
 */
export interface ExtractorSpec {
  baseSha256: string;
  layer: string;
  pooled: boolean;
  size: number;
  preprocessing: PreprocessingSpec;
  views: number;
  seed: number;
}

export interface Features {
  shape: number[];
  /** id → one array per view (view 0 first). */
  byId: Map<string, Float32Array[]>;
  failed: Map<string, { key: string; reason: string }>;
  stats: { cached: number; computed: number; failed: number; packsRead: number; packsWritten: number; seconds: number };
}

/** Images per pack (and so per checkpoint). EDGETUNE_PACK_IMAGES overrides it, for tests of resuming. */
export const PACK_IMAGES = Number(process.env.EDGETUNE_PACK_IMAGES) || 256;
const FETCH_CONCURRENCY = 8;
const BATCH = 32;

export async function cacheKeyOf(spec: ExtractorSpec): Promise<string> {
  // `views` is not part of the key: entries are per (image, view), so a run that wants fewer views
  // reuses the packs of one that wanted more.
  const { views: _views, ...identity } = spec;
  return (await sha256Hex(JSON.stringify({ v: 1, ...identity, augment: "crop-flip-v1" }))).slice(0, 24);
}

export async function extractFeatures(
  store: ObjectStore,
  extractor: tf.LayersModel,
  spec: ExtractorSpec,
  images: readonly DatasetImage[],
  onProgress: (done: number, total: number) => void = () => {},
): Promise<Features> {
  const started = performance.now();
  const prefix = keys.embeddingCache(await cacheKeyOf(spec));
  const byId = new Map<string, Float32Array[]>();
  const failed = new Map<string, { key: string; reason: string }>();
  let shape: number[] = [];
  let packsRead = 0;
  for await (const o of store.list(prefix)) {
    const bytes = await store.get(o.key);
    if (!bytes) continue;
    let pack: Pack;
    try {
      pack = decodePack(bytes);
    } catch {
      continue; // a torn pack from a killed run: its images are simply computed again
    }
    packsRead++;
    shape = pack.shape;
    for (const e of pack.entries) {
      const views = byId.get(e.id) ?? [];
      views[e.view] = e.values;
      byId.set(e.id, views);
    }
    for (const f of pack.failed) failed.set(f.id, { key: f.key, reason: f.reason });
  }
  const wanted = new Map<string, DatasetImage>();
  for (const image of images) {
    const have = byId.get(image.id);
    const complete = have !== undefined && have.length >= spec.views && have.slice(0, spec.views).every(Boolean);
    if (!complete && !failed.has(image.id)) wanted.set(image.id, image);
  }
  const todo = [...wanted.values()];
  const cached = images.length - todo.length;
  let packsWritten = 0;
  let computed = 0;
  onProgress(cached, images.length);

  // Fetch + decode run ahead of the forward pass (sharp decodes on libuv threads, off this one).
  const chunks: DatasetImage[][] = [];
  for (let i = 0; i < todo.length; i += PACK_IMAGES) chunks.push(todo.slice(i, i + PACK_IMAGES));
  let next = chunks.length > 0 ? loadChunk(store, chunks[0] as DatasetImage[], spec) : undefined;
  for (let c = 0; c < chunks.length; c++) {
    const loaded = await (next as Promise<LoadedImage[]>);
    next = c + 1 < chunks.length ? loadChunk(store, chunks[c + 1] as DatasetImage[], spec) : undefined;
    const pack: Pack = { shape: [], entries: [], failed: [] };
    const ok = loaded.filter((l): l is LoadedImage & { views: Float32Array[] } => {
      if (l.error !== undefined) pack.failed.push({ id: l.image.id, key: l.image.key, reason: l.error });
      return l.error === undefined;
    });
    const flat: { id: string; view: number; input: Float32Array }[] = ok.flatMap((l) => l.views.map((input, view) => ({ id: l.image.id, view, input })));
    for (let b = 0; b < flat.length; b += BATCH) {
      const batch = flat.slice(b, b + BATCH);
      const out = forward(
        extractor,
        batch.map((e) => e.input),
        spec.size,
        spec.pooled,
      );
      pack.shape = out.shape;
      batch.forEach((e, i) => {
        pack.entries.push({ id: e.id, view: e.view, values: out.values[i] as Float32Array });
      });
    }
    for (const f of pack.failed) failed.set(f.id, { key: f.key, reason: f.reason });
    for (const e of pack.entries) {
      const views = byId.get(e.id) ?? [];
      views[e.view] = e.values;
      byId.set(e.id, views);
    }
    if (pack.shape.length > 0) shape = pack.shape;
    else pack.shape = shape;
    await writePack(store, prefix, pack);
    packsWritten++;
    computed += ok.length;
    onProgress(cached + computed + pack.failed.length, images.length);
  }
  if (shape.length === 0 && byId.size === 0) shape = [];
  return {
    shape,
    byId,
    failed,
    stats: { cached, computed, failed: images.filter((i) => failed.has(i.id)).length, packsRead, packsWritten, seconds: (performance.now() - started) / 1000 },
  };
}

interface LoadedImage {
  image: DatasetImage;
  views?: Float32Array[];
  error?: string;
}

async function loadChunk(store: ObjectStore, chunk: DatasetImage[], spec: ExtractorSpec): Promise<LoadedImage[]> {
  const results: LoadedImage[] = new Array(chunk.length);
  let cursor = 0;
  const worker = async () => {
    while (cursor < chunk.length) {
      const i = cursor++;
      const image = chunk[i] as DatasetImage;
      try {
        const bytes = await store.get(image.key);
        if (!bytes) throw new Error("deleted while training");
        const pixels = await decodeImage(bytes);
        const views: Float32Array[] = [];
        for (let v = 0; v < spec.views; v++) views.push(preprocess(pixels, spec.size, spec.preprocessing, augmentation(pixels, v, spec.seed, image.id)));
        results[i] = { image, views };
      } catch (e) {
        results[i] = { image, error: e instanceof Error ? e.message : String(e) };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(FETCH_CONCURRENCY, chunk.length) }, worker));
  return results;
}

function forward(model: tf.LayersModel, inputs: Float32Array[], size: number, pooled: boolean): { shape: number[]; values: Float32Array[] } {
  const per = size * size * 3;
  const body = new Float32Array(inputs.length * per);
  for (const [i, x] of inputs.entries()) body.set(x, i * per);
  const result = tf.tidy(() => {
    let y = model.predict(tf.tensor4d(body, [inputs.length, size, size, 3])) as tf.Tensor;
    if (pooled && y.rank === 4) y = tf.mean(y, [1, 2]);
    return y;
  });
  const data = result.dataSync() as Float32Array;
  const shape = result.shape.slice(1);
  result.dispose();
  const dim = shape.reduce((a, b) => a * b, 1);
  return { shape, values: inputs.map((_, i) => data.slice(i * dim, (i + 1) * dim)) };
}

async function writePack(store: ObjectStore, prefix: string, pack: Pack): Promise<void> {
  const ids = [...pack.entries.map((e: PackEntry) => `${e.id}/${e.view}`), ...pack.failed.map((f) => f.id)].sort();
  const name = (await sha256Hex(ids.join("\n"))).slice(0, 20);
  await store.put(`${prefix}${name}.bin`, encodePack(pack));
}
