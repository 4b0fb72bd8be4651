import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { join } from "node:path";
import * as tf from "@tensorflow/tfjs";
import { EdgetuneError, NotFoundError } from "#shared/errors.ts";
import { sha256Hex } from "#shared/hash.ts";
import { loadModel } from "./io.ts";

/**
 * Where a known base's weights come from when the bucket does not hold it yet. No weights are committed
 * with the project: a base is read from a local bases directory (`EDGETUNE_BASES_DIR`: an offline or
 * air-gapped machine's copy, `../shared/models` for `npm start`, the tests and the benchmarks),
 * downloaded from its publisher pinned by sha256, or — the last resort — taken from the nsfwjs npm package.
 */
export type BaseSource =
  /** A folder of the bases directory (named as in `../shared/models`). */
  | { kind: "dir"; dir: string; sha256?: string }
  /** The publisher's model.json; `sha256` pins the files (see `filesHash`); without it the download is recorded unpinned. */
  | { kind: "url"; url: string; sha256?: string }
  | { kind: "nsfwjs" };

/** A source's files, read and checked. */
export interface FetchedModel {
  model: tf.LayersModel;
  /** What base.json's `source` records, for people. */
  provenance: string;
}

/** The publishers' origins; EDGETUNE_BASE_MIRROR replaces any of them (a mirror holding the same paths, or a test server). */
export const TM_ORIGIN = "https://storage.googleapis.com/teachable-machine-models";
export const ML5_ORIGIN = "https://cdn.jsdelivr.net/gh/ml5js/ml5-data-and-models@master";
const ORIGINS = [TM_ORIGIN, ML5_ORIGIN];

export function mirrored(url: string): string {
  const mirror = process.env.EDGETUNE_BASE_MIRROR?.replace(/\/$/, "");
  const origin = ORIGINS.find((o) => url.startsWith(o));
  return mirror && origin ? mirror + url.slice(origin.length) : url;
}

/** The bases directory, if one is configured. */
export const basesDir = (): string | undefined => process.env.EDGETUNE_BASES_DIR || undefined;

/** Downloads are off by design (`EDGETUNE_OFFLINE=1`: `npm start`, the tests): a download is not even tried. */
export const offline = (): boolean => ["1", "true"].includes(process.env.EDGETUNE_OFFLINE ?? "");

/** Why a source was passed over, in a few plain words (goes into the one log line that says which source was used). */
export class SourceUnavailable extends EdgetuneError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("base_unreachable", message, options);
  }
}

/**
 * One sha256 for a model's files: over "<path> <sha256 of the file>\n" in model.json-then-manifest order,
 * so one pinned constant covers the 30-odd shards of a publisher's model.
 */
export async function filesHash(files: ReadonlyMap<string, Uint8Array>): Promise<string> {
  const lines: string[] = [];
  for (const [path, bytes] of files) lines.push(`${path} ${await sha256Hex(bytes)}\n`);
  return sha256Hex(lines.join(""));
}

/** Reads a source's model, checking its pin; throws `SourceUnavailable` when the source is simply not there. */
export async function fetchSource(source: BaseSource): Promise<FetchedModel> {
  switch (source.kind) {
    case "nsfwjs":
      return { model: await loadNsfwjs(), provenance: "npm nsfwjs dist/models/mobilenet_v2 (installed with the project)" };
    case "dir": {
      const root = basesDir();
      if (!root) throw new SourceUnavailable("no bases directory (EDGETUNE_BASES_DIR is not set)");
      const path = join(root, source.dir);
      const files = await readFiles((p) => readFile(join(path, p)).then((b) => new Uint8Array(b)), `${path}/`, true);
      await checkPin(files, source.sha256, path);
      return { model: await toModel(files), provenance: `bases directory ${path} (EDGETUNE_BASES_DIR)` };
    }
    case "url": {
      if (offline()) throw new SourceUnavailable("downloads are off (EDGETUNE_OFFLINE)");
      const url = mirrored(source.url);
      const prefix = url.slice(0, url.lastIndexOf("/") + 1);
      const files = await readFiles((p) => download(prefix + p), prefix, false);
      await checkPin(files, source.sha256, url);
      const via = url === source.url ? source.url : `${url} (EDGETUNE_BASE_MIRROR, standing in for ${source.url})`;
      return { model: await toModel(files), provenance: source.sha256 ? `${via}, sha256-pinned` : `${via} (no pinned sha256)` };
    }
  }
}

/** model.json, then every shard its manifest names. A missing model.json means the source is not there. */
async function readFiles(read: (path: string) => Promise<Uint8Array>, where: string, local: boolean): Promise<Map<string, Uint8Array>> {
  const json = await read("model.json").catch((e: unknown) => {
    if (e instanceof SourceUnavailable) throw e;
    throw new SourceUnavailable(local ? `no ${where}model.json` : `could not download ${where}model.json`, { cause: e });
  });
  const files = new Map([["model.json", json]]);
  const manifest = JSON.parse(new TextDecoder().decode(json)) as { weightsManifest: { paths: string[] }[] };
  for (const p of manifest.weightsManifest.flatMap((g) => g.paths)) {
    files.set(
      p,
      await read(p).catch((e: unknown) => {
        if (e instanceof SourceUnavailable) throw e;
        throw new NotFoundError(`The base at ${where} is incomplete: ${p} could not be read.`);
      }),
    );
  }
  return files;
}

async function checkPin(files: ReadonlyMap<string, Uint8Array>, pinned: string | undefined, where: string): Promise<void> {
  if (!pinned) return;
  const actual = await filesHash(files);
  if (actual !== pinned) {
    throw new EdgetuneError(
      "integrity_mismatch",
      `The base files at ${where} are not the ones edgetune pins (sha256 ${actual.slice(0, 12)}… instead of ${pinned.slice(0, 12)}…): refusing them.`,
    );
  }
}

/** Each request gets EDGETUNE_DOWNLOAD_TIMEOUT_MS: a network that drops packets must not hold a run for long. */
async function download(url: string): Promise<Uint8Array> {
  const timeout = Number(process.env.EDGETUNE_DOWNLOAD_TIMEOUT_MS || 60_000);
  let res: Response;
  try {
    res = await fetch(url, { signal: AbortSignal.timeout(timeout) });
  } catch (e) {
    const detail = e instanceof Error ? (e.cause instanceof Error ? e.cause.message : e.message) : String(e);
    throw new SourceUnavailable(`could not reach ${new URL(url).host} (${detail})`, { cause: e });
  }
  if (!res.ok) throw new SourceUnavailable(`${url} answered HTTP ${res.status}`);
  return new Uint8Array(await res.arrayBuffer());
}

function toModel(files: ReadonlyMap<string, Uint8Array>): Promise<tf.LayersModel> {
  return loadModel(files.get("model.json") as Uint8Array, new Map([...files].filter(([p]) => p !== "model.json")));
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
