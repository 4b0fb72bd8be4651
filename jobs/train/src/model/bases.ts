import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { join } from "node:path";
import * as tf from "@tensorflow/tfjs";
import { type BaseMetadata, baseMetadataSchema } from "../../../../shared/contracts/base.ts";
import { parseContract, parseContractJson } from "../../../../shared/contracts/parse.ts";
import { EdgetuneError, IntegrityError, InvalidOptionError, NotFoundError, userMessage } from "../../../../shared/errors.ts";
import { sha256Hex } from "../../../../shared/hash.ts";
import { keys } from "../../../../shared/keys.ts";
import type { Normalization } from "../../../../shared/preprocess.ts";
import type { ObjectStore } from "../../../../shared/s3/store.ts";
import { loadModel, modelToFiles, WEIGHTS_FILE } from "./io.ts";
import { roundWeightsToHalf } from "./weights.ts";

/**
 * Pretrained bases. A base is stored once under `bases/<id>/` (contract: shared/contracts/base.ts),
 * already cut at its feature layer, with input size left open, weights in float16. Training loads it
 * from there, so every job in a run uses byte-identical weights, recorded by sha256 in the model.
 */

/** Bases edgetune knows by name. `nsfwjs` and `bundled` install with the project; `url` needs internet once. */
export interface KnownBase {
  id: string;
  description: string;
  source: { kind: "nsfwjs" } | { kind: "bundled"; dir: string } | { kind: "url"; url: string };
  featureLayer: string;
  /**
   * Mid-level layers whose pooled features join the feature layer's for a head (strategy `head`): kept
   * only where the reference datasets measured a gain (bench/RESULTS.md, "features from several layers").
   */
  pooledLayers?: readonly string[];
  fineTuneFrom: string;
  normalization: Normalization;
  licence: string;
}

/** Where Teachable Machine publishes its ImageNet bases; EDGETUNE_BASE_MIRROR replaces it (a mirror, or a test server). */
export const TM_ORIGIN = "https://storage.googleapis.com/teachable-machine-models";
const TM_URL = (alpha: string) => `${TM_ORIGIN}/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_${alpha}_224_no_top/model.json`;
const mirrored = (url: string) => (process.env.EDGETUNE_BASE_MIRROR ? url.replace(TM_ORIGIN, process.env.EDGETUNE_BASE_MIRROR.replace(/\/$/, "")) : url);

/** Bases committed with the project (jobs/train/bases/<id>/, each with its licence and provenance). */
const BUNDLED_DIR = join(import.meta.dirname, "..", "..", "bases");

export const KNOWN_BASES: readonly KnownBase[] = [
  {
    id: "darknet-tiny",
    description:
      "Tiny Darknet, ImageNet-1k (ml5's tfjs port, as in ../shared/models/darknet_tiny); cut at its last 1×1 convolution. The clean ImageNet base that installs with the project.",
    source: { kind: "bundled", dir: "darknet-tiny" },
    featureLayer: "conv2d_16",
    pooledLayers: ["leaky_re_lu_12", "leaky_re_lu_14", "leaky_re_lu_15"],
    fineTuneFrom: "leaky_re_lu_14",
    normalization: "0-1",
    licence: "MIT (ml5 models, see jobs/train/bases/darknet-tiny/LICENSE.ml5-data-and-models)",
  },
  {
    id: "mobilenet-v1-025",
    description: "MobileNet v1 α=0.25, ImageNet-1k (Google's weights; topology rebuilt, see its README-rebuild.md). Smallest and fastest.",
    source: { kind: "bundled", dir: "mobilenet-v1-025" },
    featureLayer: "conv_pw_13_relu",
    fineTuneFrom: "conv_pw_11_relu",
    normalization: "minus1-1",
    licence: "Apache-2.0 (Google MobileNet weights, see jobs/train/bases/mobilenet-v1-025/LICENSE)",
  },
  {
    id: "nsfwjs-mobilenet-v2",
    description:
      "MobileNetV2 1.0 shipped in the nsfwjs npm package (offline default). Not a clean ImageNet base: blocks 11–16 were tuned for NSFW detection and the weights are uint8.",
    source: { kind: "nsfwjs" },
    featureLayer: "block_16_project_BN",
    fineTuneFrom: "block_12_add",
    normalization: "0-1",
    licence: "MIT (nsfwjs, Infinite Red)",
  },
  ...(["0.35", "0.50", "0.75", "1.00"] as const).map(
    (alpha): KnownBase => ({
      id: `mobilenet-v2-${alpha.replace(".", "")}`,
      description: `Keras MobileNetV2 α=${alpha} ImageNet weights without top, as published for Teachable Machine (needs internet once).`,
      source: { kind: "url", url: TM_URL(alpha) },
      featureLayer: "out_relu",
      fineTuneFrom: "block_12_add",
      normalization: "minus1-1",
      licence: "Apache-2.0 (Keras applications weights)",
    }),
  ),
];
/** The extra layers a head pools for this base (its `pooledLayers` when it is a base known by name). */
export function poolsOf(base: Pick<BaseMetadata, "id">): readonly string[] {
  return KNOWN_BASES.find((k) => k.id === base.id)?.pooledLayers ?? [];
}

/**
 * The best base that installs with the project, chosen by measurement (bench/RESULTS.md, "Which base by
 * default"): the best accuracy on the reference datasets among the bundled bases, at an edge p50 ≤ 50 ms.
 */
export const BEST_BUNDLED_BASE = "darknet-tiny";
/** The clean Keras ImageNet MobileNetV2 (α 1.0): published 94–98 % on the reference datasets; 22 ms at 224 px at the edge. */
export const PREFERRED_DOWNLOADED_BASE = "mobilenet-v2-100";
/** The default: the preferred downloadable base where it can be fetched (once, into the bucket), else the best bundled one. */
export const AUTO_BASE = "auto";
/** A failed download is not tried again for this long (each run would otherwise wait for it). */
const AUTO_RETRY_MS = 24 * 3600_000;

export interface ImportOptions {
  id: string;
  featureLayer: string;
  normalization: Normalization;
  fineTuneFrom?: string;
  description?: string;
  licence?: string;
  source?: string;
}

/** A LayersModel source: an http(s) URL of model.json, a local folder holding model.json, or s3://. */
export type ModelSource = { kind: "nsfwjs" } | { kind: "url"; url: string } | { kind: "dir"; path: string } | { kind: "s3"; store: ObjectStore; key: string };

/** Reads, cuts at the feature layer, re-encodes and stores a base. Idempotent for identical bytes. */
export async function importBase(store: ObjectStore, source: ModelSource, options: ImportOptions): Promise<BaseMetadata> {
  const full = await loadSource(source);
  try {
    const layer = full.getLayer(options.featureLayer);
    if (!layer) throw new NotFoundError(`Layer ${options.featureLayer} is not in the model.`);
    const cut = tf.model({ inputs: full.inputs, outputs: layer.output as tf.SymbolicTensor, name: options.id });
    const files = await modelToFiles(cut, "float16");
    const json = JSON.parse(new TextDecoder().decode(files.modelJson));
    // Leave the input size open: the job fixes it per training run.
    const config = json.modelTopology.config ?? json.modelTopology.model_config?.config;
    for (const l of config.layers) if (l.class_name === "InputLayer") l.config.batch_input_shape = [null, null, null, 3];
    const modelJson = new TextEncoder().encode(JSON.stringify(json));
    const list = [
      { path: "model.json", bytes: modelJson },
      { path: WEIGHTS_FILE, bytes: files.weights },
    ];
    const described = await Promise.all(list.map(async (f) => ({ path: f.path, sha256: await sha256Hex(f.bytes), bytes: f.bytes.byteLength })));
    const metadata = parseContract(
      baseMetadataSchema,
      {
        schemaVersion: 1,
        id: options.id,
        description: options.description ?? `Imported from ${describeSource(source)}`,
        featureLayer: options.featureLayer,
        inputSize: nearestSize((full.inputs[0]?.shape[1] as number | null) ?? 224),
        normalization: options.normalization,
        fineTuneFrom: options.fineTuneFrom,
        licence: options.licence ?? "unknown (set --licence)",
        source: options.source ?? describeSource(source),
        sha256: await sha256Hex(described.map((d) => d.sha256).join("")),
        files: described,
      },
      `base ${options.id}`,
    );
    for (const f of list) await store.put(keys.base(options.id) + f.path, f.bytes);
    await store.put(keys.baseMetadata(options.id), `${JSON.stringify(metadata, null, 2)}\n`, "application/json");
    return metadata;
  } finally {
    full.dispose();
  }
}

/** The bases `--base best` scores: every bundled one (best first), and the preferred downloadable one where it is in the bucket. */
export async function baseCandidates(store: ObjectStore): Promise<BaseMetadata[]> {
  const bundled = KNOWN_BASES.filter((b) => b.source.kind !== "url").map((b) => b.id);
  const ids = [BEST_BUNDLED_BASE, ...bundled.filter((id) => id !== BEST_BUNDLED_BASE)];
  const out: BaseMetadata[] = [];
  for (const id of ids) out.push(await ensureBase(store, id));
  if (await store.head(keys.baseMetadata(PREFERRED_DOWNLOADED_BASE))) out.push(await ensureBase(store, PREFERRED_DOWNLOADED_BASE));
  return out;
}

/** Which base `auto` resolved to, and why (recorded in the version's metadata and report). */
export interface BaseChoice {
  requested: string;
  reason: string;
}

/**
 * The base a run uses: `requested` itself, or for `auto` the clean ImageNet MobileNetV2 when it is in
 * the bucket or can be downloaded into it now, else the best bundled base. A failed download is
 * remembered in the bucket (`bases/auto-unreachable.json`) and not tried again for a day.
 */
export async function resolveBase(store: ObjectStore, requested: string): Promise<{ base: BaseMetadata; choice?: BaseChoice }> {
  if (requested !== AUTO_BASE) return { base: await ensureBase(store, requested) };
  const preferred = PREFERRED_DOWNLOADED_BASE;
  const stored = await store.get(keys.baseMetadata(preferred));
  if (stored) {
    const base = parseContractJson(baseMetadataSchema, new TextDecoder().decode(stored), keys.baseMetadata(preferred));
    return { base, choice: { requested, reason: `${preferred} (ImageNet MobileNetV2) is in the bucket` } };
  }
  const fallback = async (why: string) => ({
    base: await ensureBase(store, BEST_BUNDLED_BASE),
    choice: { requested, reason: `${preferred} could not be downloaded (${why}); using the best bundled base, ${BEST_BUNDLED_BASE}` },
  });
  const marker = await store.get(AUTO_MARKER);
  const last = marker ? (parseJson(marker) as { at?: string; reason?: string } | null) : null;
  if (last?.at && Date.now() - Date.parse(last.at) < AUTO_RETRY_MS) return fallback(`${last.reason}, at ${last.at}; tried again a day later`);
  try {
    const base = await ensureBase(store, preferred);
    return { base, choice: { requested, reason: `${preferred} (ImageNet MobileNetV2) was downloaded once into the bucket` } };
  } catch (e) {
    // Only an unreachable download is remembered (for a day, bucket-wide); a storage hiccup while importing
    // falls back for this run only.
    if (!(e instanceof EdgetuneError && e.code === "base_unreachable")) return fallback(userMessage(e));
    const reason = e.cause instanceof Error ? e.cause.message : "unreachable";
    await store.put(AUTO_MARKER, JSON.stringify({ at: new Date().toISOString(), reason }), "application/json").catch(() => {});
    return fallback(reason);
  }
}
const AUTO_MARKER = "bases/auto-unreachable.json";
function parseJson(bytes: Uint8Array): unknown {
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return null;
  }
}

/** Makes sure a known base is in the bucket (downloading or unpacking it once), returns its metadata. */
export async function ensureBase(store: ObjectStore, id: string): Promise<BaseMetadata> {
  const existing = await store.get(keys.baseMetadata(id));
  if (existing) return parseContractJson(baseMetadataSchema, new TextDecoder().decode(existing), keys.baseMetadata(id));
  const known = KNOWN_BASES.find((b) => b.id === id);
  if (!known) {
    throw new InvalidOptionError("base", id, [...KNOWN_BASES.map((b) => b.id), "(or any id imported with `edgetune base import`)"]);
  }
  const source: ModelSource =
    known.source.kind === "bundled"
      ? { kind: "dir", path: join(BUNDLED_DIR, known.source.dir) }
      : known.source.kind === "url"
        ? { kind: "url", url: mirrored(known.source.url) }
        : known.source;
  const provenance =
    known.source.kind === "url"
      ? mirrored(known.source.url) === known.source.url
        ? known.source.url
        : `${mirrored(known.source.url)} (EDGETUNE_BASE_MIRROR, standing in for ${known.source.url})`
      : known.source.kind === "bundled"
        ? `edgetune jobs/train/bases/${known.source.dir}`
        : "npm nsfwjs dist/models/mobilenet_v2";
  return importBase(store, source, { ...known, source: provenance });
}

/** A stored base, verified, loaded at `size`×`size`. The caller disposes it. */
export async function loadBase(store: ObjectStore, metadata: BaseMetadata, size: number): Promise<tf.LayersModel> {
  const shards = new Map<string, Uint8Array>();
  for (const f of metadata.files) {
    const key = keys.base(metadata.id) + f.path;
    const bytes = await store.get(key);
    if (!bytes) throw new NotFoundError(`Base ${metadata.id} is incomplete: ${key} is missing. Re-import it.`);
    const actual = await sha256Hex(bytes);
    if (actual !== f.sha256) throw new IntegrityError(key, f.sha256, actual);
    shards.set(f.path, bytes);
  }
  // BatchNorm folded into the convolutions: same function, faster, and frozen BN for fine-tuning.
  const model = await loadModel(shards.get("model.json") as Uint8Array, shards, size, { foldBatchNorm: true });
  // Folding makes float32 weights that the export stores as float16, which the edge then runs. The
  // features are computed with exactly those numbers: a head (trained on standardised features, which
  // magnify small differences) never meets features other than those it was trained on.
  roundWeightsToHalf(model);
  return model;
}

async function loadSource(source: ModelSource): Promise<tf.LayersModel> {
  switch (source.kind) {
    case "nsfwjs":
      return loadNsfwjs();
    case "url":
      try {
        // Each request gets DOWNLOAD_TIMEOUT_MS: a network that drops packets must not hold a run for long.
        const timeout = Number(process.env.EDGETUNE_DOWNLOAD_TIMEOUT_MS || 60_000);
        return await tf.loadLayersModel(
          tf.io.http(source.url, {
            fetchFunc: ((url: string | URL | Request, init?: RequestInit) => fetch(url, { ...init, signal: AbortSignal.timeout(timeout) })) as typeof fetch,
          }),
        );
      } catch (e) {
        const detail = e instanceof Error ? (e.cause instanceof Error ? `${e.message}: ${e.cause.message}` : e.message) : String(e);
        throw new EdgetuneError(
          "base_unreachable",
          `Could not download the base from ${source.url} (${detail}). It needs internet once; after that it is kept in the bucket.`,
          { cause: new Error(detail) },
        );
      }
    case "dir": {
      const json = await readFile(join(source.path, "model.json")).catch(() => {
        throw new NotFoundError(`No model.json in ${source.path}.`);
      });
      const manifest = JSON.parse(json.toString()) as { weightsManifest: { paths: string[] }[] };
      const shards = new Map<string, Uint8Array>();
      for (const p of manifest.weightsManifest.flatMap((g) => g.paths)) shards.set(p, await readFile(join(source.path, p)));
      return loadModel(new Uint8Array(json), shards);
    }
    case "s3": {
      const prefix = source.key.endsWith("model.json") ? source.key.slice(0, -"model.json".length) : source.key.replace(/\/?$/, "/");
      const json = await source.store.get(`${prefix}model.json`);
      if (!json) throw new NotFoundError(`No model.json under ${prefix}.`);
      const manifest = JSON.parse(new TextDecoder().decode(json)) as { weightsManifest: { paths: string[] }[] };
      const shards = new Map<string, Uint8Array>();
      for (const p of manifest.weightsManifest.flatMap((g) => g.paths)) {
        const bytes = await source.store.get(prefix + p);
        if (!bytes) throw new NotFoundError(`Weight shard ${prefix + p} is missing.`);
        shards.set(p, bytes);
      }
      return loadModel(json, shards);
    }
  }
}

/** The MobileNetV2 inside the nsfwjs package: UMD modules holding model.json and base64 weights. */
async function loadNsfwjs(): Promise<tf.LayersModel> {
  const require = createRequire(import.meta.url);
  const entry = require.resolve("nsfwjs");
  const dir = `${entry.slice(0, entry.lastIndexOf("/dist/"))}/dist/models/mobilenet_v2/`;
  const model = require(`${dir}model.min.js`) as { modelTopology: object; weightsManifest: { weights: tf.io.WeightsManifestEntry[] }[] };
  const weights = Buffer.from(require(`${dir}group1-shard1of1.min.js`) as string, "base64");
  return tf.loadLayersModel(
    tf.io.fromMemory({
      modelTopology: model.modelTopology,
      weightSpecs: model.weightsManifest.flatMap((g) => g.weights),
      weightData: weights.buffer.slice(weights.byteOffset, weights.byteOffset + weights.byteLength),
    }),
  );
}

function describeSource(source: ModelSource): string {
  return source.kind === "url" ? source.url : source.kind === "dir" ? source.path : source.kind === "s3" ? `s3 ${source.key}` : "nsfwjs";
}

function nearestSize(n: number): 96 | 128 | 160 | 192 | 224 {
  const sizes = [96, 128, 160, 192, 224] as const;
  return sizes.reduce((best, s) => (Math.abs(s - n) < Math.abs(best - n) ? s : best), 224 as (typeof sizes)[number]);
}
