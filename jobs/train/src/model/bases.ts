import { readFile } from "node:fs/promises";
import { join } from "node:path";
import * as tf from "@tensorflow/tfjs";
import { type BaseMetadata, baseMetadataSchema } from "#shared/contracts/base.ts";
import { parseContract, parseContractJson } from "#shared/contracts/parse.ts";
import { IntegrityError, InvalidOptionError, NotFoundError } from "#shared/errors.ts";
import { sha256Hex } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import type { Normalization } from "#shared/preprocess.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import { type BaseSource, fetchSource, ML5_ORIGIN, offline, SourceUnavailable, TM_ORIGIN } from "./base-sources.ts";
import { loadModel, modelToFiles, WEIGHTS_FILE } from "./io.ts";
import { roundWeightsToHalf } from "./weights.ts";

/**
 * Pretrained bases. A base is stored once under `bases/<id>/` (contract: shared/contracts/base.ts),
 * already cut at its feature layer, with input size left open, weights in float16. Training loads it
 * from there, so every job in a run uses byte-identical weights, recorded by sha256 in the model.
 * No weights are committed with the project: see base-sources.ts for where they come from.
 */

/** The files of ml5's Tiny Darknet (`filesHash`), as served by ml5 and as in ../shared/models/darknet_tiny. */
const DARKNET_TINY_SHA256 = "f6102bcd96e2d87466b9faeee3efbce233b3ff02f314d27f9de9d5488c9c4f02";
/** The base that installs with the project (npm nsfwjs): the last resort. */
export const NSFWJS_BASE = "nsfwjs-mobilenet-v2";

/** Bases edgetune knows by name, with where each comes from when the bucket does not hold it yet (tried in order). */
export interface KnownBase {
  id: string;
  description: string;
  sources: readonly BaseSource[];
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

const TM_URL = (alpha: string) => `${TM_ORIGIN}/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_${alpha}_224_no_top/model.json`;

export const KNOWN_BASES: readonly KnownBase[] = [
  {
    id: "mobilenet-v2-slim-100",
    description:
      "MobileNetV2 1.0, ImageNet-1k: Google's TF-slim weights (BN folded) as a tfjs model with Keras layer names. From the bases directory only (mobilenet_v2_1.0_224_slim/): Google publishes them as a TensorFlow checkpoint, not for tfjs.",
    sources: [{ kind: "dir", dir: "mobilenet_v2_1.0_224_slim", sha256: "a2e606d2b80a0e2aa009aff574251b58197a1c8cba73334d24671dd359fad0ac" }],
    featureLayer: "out_relu",
    // At 224 px, head: flowers128 68.8 → 72.6 %, hymenoptera 97.4 → 96.7 % (one image) over out_relu alone (bench/RESULTS.md).
    pooledLayers: ["block_6_expand_relu", "block_13_expand_relu", "block_16_project"],
    fineTuneFrom: "block_12_add",
    normalization: "minus1-1",
    licence: "Apache-2.0 (Google TF-slim MobileNetV2 weights; LICENSE beside them in the bases directory)",
  },
  ...(["1.00", "0.75", "0.50", "0.35"] as const).map(
    (alpha): KnownBase => ({
      id: `mobilenet-v2-${alpha.replace(".", "")}`,
      description: `Keras MobileNetV2 α=${alpha} ImageNet weights without top, as Teachable Machine publishes them (downloaded once into the bucket; not pinned: no copy to take a checksum from here).`,
      sources: [{ kind: "url", url: TM_URL(alpha) }],
      featureLayer: "out_relu",
      fineTuneFrom: "block_12_add",
      normalization: "minus1-1",
      licence: "Apache-2.0 (Keras applications weights)",
    }),
  ),
  {
    id: "darknet-tiny",
    description:
      "Tiny Darknet, ImageNet-1k (ml5's tfjs port); cut at its last 1×1 convolution. From the bases directory (darknet_tiny/) or ml5's origin, sha256-pinned.",
    // One pin for both: the bases directory holds the very files ml5 serves.
    sources: [
      { kind: "dir", dir: "darknet_tiny", sha256: DARKNET_TINY_SHA256 },
      { kind: "url", url: `${ML5_ORIGIN}/models/darknetclassifier/darknettiny/model.json`, sha256: DARKNET_TINY_SHA256 },
    ],
    featureLayer: "conv2d_16",
    pooledLayers: ["leaky_re_lu_12", "leaky_re_lu_14", "leaky_re_lu_15"],
    fineTuneFrom: "leaky_re_lu_14",
    normalization: "0-1",
    licence: "MIT (ml5-data-and-models; LICENSE.ml5-data-and-models beside it in the bases directory)",
  },
  {
    id: "mobilenet-v1-025",
    description:
      "MobileNet v1 α=0.25, ImageNet-1k (Google's weights, topology rebuilt, see its README-rebuild.md). Smallest and fastest. From the bases directory only (mobilenet_v1_0.25_224/): its model.json is a rebuild no publisher serves.",
    sources: [{ kind: "dir", dir: "mobilenet_v1_0.25_224", sha256: "e7e2245cdf770407bb5fd96a0bf4e73c6ff92954472e3ace4a904068c87b2f32" }],
    featureLayer: "conv_pw_13_relu",
    fineTuneFrom: "conv_pw_11_relu",
    normalization: "minus1-1",
    licence: "Apache-2.0 (Google MobileNet weights)",
  },
  {
    id: NSFWJS_BASE,
    description:
      "MobileNetV2 1.0 shipped in the nsfwjs npm package: the last resort, always installed. Not a clean ImageNet base: blocks 11–16 were tuned for NSFW detection and the weights are uint8.",
    sources: [{ kind: "nsfwjs" }],
    featureLayer: "block_16_project_BN",
    fineTuneFrom: "block_12_add",
    normalization: "0-1",
    licence: "MIT (nsfwjs, Infinite Red)",
  },
];
/** The extra layers a head pools for this base (its `pooledLayers` when it is a base known by name). */
export function poolsOf(base: Pick<BaseMetadata, "id">): readonly string[] {
  return KNOWN_BASES.find((k) => k.id === base.id)?.pooledLayers ?? [];
}

/** The default: the first of `AUTO_ORDER` the run can get (bench/RESULTS.md, "Which base by default"). */
export const AUTO_BASE = "auto";
/** Chosen per dataset by cross-validating every candidate base (model/choose-base.ts). */
export const BEST_BASE = "best";
/**
 * What `auto` prefers: the clean ImageNet MobileNetV2s (the slim weights first: the measured ones), then
 * Tiny Darknet, then the nsfwjs MobileNetV2, which installs with the project and so is always there.
 */
export const AUTO_ORDER = ["mobilenet-v2-slim-100", "mobilenet-v2-100", "darknet-tiny", NSFWJS_BASE] as const;
/** What `auto` means, in the words README, `edgetune base list` and `train --help` use. */
export const AUTO_DESCRIPTION =
  "the best clean ImageNet MobileNetV2 available (mobilenet-v2-slim-100 from a bases directory, else mobilenet-v2-100 from Teachable Machine), else darknet-tiny, else the nsfwjs MobileNetV2 (last resort)";
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
  return storeBase(store, await loadSource(source), { ...options, source: options.source ?? describeSource(source) });
}

/** Cuts a loaded model (disposed here) at its feature layer and stores it as base `options.id`. */
async function storeBase(store: ObjectStore, full: tf.LayersModel, options: ImportOptions & { source: string }): Promise<BaseMetadata> {
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
        description: options.description ?? `Imported from ${options.source}`,
        featureLayer: options.featureLayer,
        inputSize: nearestSize((full.inputs[0]?.shape[1] as number | null) ?? 224),
        normalization: options.normalization,
        fineTuneFrom: options.fineTuneFrom,
        licence: options.licence ?? "unknown (set --licence)",
        source: options.source,
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

/** A base and where it came from this time ("the bucket", or the source it was just stored from). */
export interface ObtainedBase {
  base: BaseMetadata;
  from: string;
}

/**
 * A known base from the bucket, else from its sources in order (stored into the bucket on the way), never
 * downloading when `downloads` is false. Throws a `SourceUnavailable` naming why each source was passed over.
 */
export async function obtainBase(store: ObjectStore, id: string, downloads = true): Promise<ObtainedBase> {
  const existing = await store.get(keys.baseMetadata(id));
  if (existing) return { base: parseContractJson(baseMetadataSchema, new TextDecoder().decode(existing), keys.baseMetadata(id)), from: "the bucket" };
  const known = KNOWN_BASES.find((b) => b.id === id);
  if (!known) {
    throw new InvalidOptionError("base", id, [...KNOWN_BASES.map((b) => b.id), "(or any id imported with `edgetune base import`)"]);
  }
  const passed: string[] = [];
  for (const source of known.sources) {
    if (source.kind === "url" && !downloads) {
      passed.push("download skipped (a recent download failed)");
      continue;
    }
    let fetched: Awaited<ReturnType<typeof fetchSource>>;
    try {
      fetched = await fetchSource(source);
    } catch (e) {
      if (!(e instanceof SourceUnavailable)) throw e;
      passed.push(e.message);
      continue;
    }
    const base = await storeBase(store, fetched.model, { ...known, source: fetched.provenance });
    return { base, from: fetched.provenance };
  }
  const hint = known.sources.some((s) => s.kind === "dir")
    ? ` Set EDGETUNE_BASES_DIR to a folder holding ${known.sources.flatMap((s) => (s.kind === "dir" ? [`${s.dir}/`] : [])).join(" or ")}${known.sources.some((s) => s.kind === "url") ? ", or allow the download" : ""}.`
    : "";
  throw new SourceUnavailable(`Base ${id} is not in the bucket and none of its sources is available: ${passed.join("; ")}.${hint}`);
}

/** Makes sure a known base is in the bucket (reading or downloading it once), returns its metadata. */
export async function ensureBase(store: ObjectStore, id: string): Promise<BaseMetadata> {
  return (await obtainBase(store, id)).base;
}

/**
 * The bases `--base best` scores: each known base the bucket or the bases directory holds (never a
 * download), in `auto`'s order, then the others; the nsfwjs one is always among them.
 */
export async function baseCandidates(store: ObjectStore): Promise<BaseMetadata[]> {
  const ids = [...AUTO_ORDER, ...KNOWN_BASES.map((b) => b.id).filter((id) => !(AUTO_ORDER as readonly string[]).includes(id))];
  const out: BaseMetadata[] = [];
  for (const id of ids) {
    const got = await obtainBase(store, id, false).catch((e: unknown) => {
      if (e instanceof SourceUnavailable) return null;
      throw e;
    });
    if (got) out.push(got.base);
  }
  return out;
}

/** Which base `auto` resolved to, and why (recorded in the version's metadata and report). */
export interface BaseChoice {
  requested: string;
  reason: string;
}

/**
 * The base a run uses and where it came from: `requested` itself, or for `auto` the first of `AUTO_ORDER`
 * that the bucket, the bases directory or a download provides. A failed download is remembered in the
 * bucket (`bases/auto-unreachable.json`) and not tried again for a day; offline by design
 * (`EDGETUNE_OFFLINE`), nothing is downloaded.
 */
export async function resolveBase(store: ObjectStore, requested: string): Promise<ObtainedBase & { choice?: BaseChoice }> {
  if (requested !== AUTO_BASE) return obtainBase(store, requested);
  const marker = offline() ? null : await store.get(AUTO_MARKER);
  const last = marker ? (parseJson(marker) as { at?: string; reason?: string } | null) : null;
  let downloads = !(last?.at && Date.now() - Date.parse(last.at) < AUTO_RETRY_MS);
  const passed: string[] = [];
  for (const id of AUTO_ORDER) {
    try {
      const got = await obtainBase(store, id, downloads);
      const why = id === NSFWJS_BASE ? "the last resort, not a clean ImageNet base" : "the first of auto's order available";
      const skipped = passed.length > 0 ? `; passed over: ${passed.join("; ")}` : "";
      return { ...got, choice: { requested, reason: `${id} from ${got.from} (${why})${skipped}` } };
    } catch (e) {
      if (!(e instanceof SourceUnavailable)) throw e;
      passed.push(
        e.message.replace(/^Base (\S+) is not in the bucket and none of its sources is available: /, "$1: ").replace(/\. Set EDGETUNE_BASES_DIR.*$/, ""),
      );
      // Only an unreachable download is remembered (for a day, bucket-wide), so later runs do not wait for it.
      if (downloads && !offline() && /could not reach|answered HTTP/.test(e.message)) {
        downloads = false;
        await store.put(AUTO_MARKER, JSON.stringify({ at: new Date().toISOString(), reason: e.message }), "application/json").catch(() => {});
      }
    }
  }
  throw new SourceUnavailable(`No base is available: ${passed.join("; ")}.`);
}
const AUTO_MARKER = "bases/auto-unreachable.json";
function parseJson(bytes: Uint8Array): unknown {
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return null;
  }
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
    case "url":
      return (await fetchSource(source)).model;
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

function describeSource(source: ModelSource): string {
  return source.kind === "url" ? source.url : source.kind === "dir" ? source.path : source.kind === "s3" ? `s3 ${source.key}` : "nsfwjs";
}

function nearestSize(n: number): 96 | 128 | 160 | 192 | 224 {
  const sizes = [96, 128, 160, 192, 224] as const;
  return sizes.reduce((best, s) => (Math.abs(s - n) < Math.abs(best - n) ? s : best), 224 as (typeof sizes)[number]);
}
