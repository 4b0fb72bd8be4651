/**
 * The S3 key layout, in one place. Every key edgetune reads or writes is built here.
 *
 *   datasets/<name>/manifest.json              written last by the uploader: "dataset complete"
 *   datasets/<name>/[<split>/]<label>/<file>   images
 *   bases/<id>/{base.json,model.json,*.bin}    pretrained bases
 *   models/<name>/<version>/...                immutable trained versions (see contracts/artifact.ts)
 *   models/<name>/current.json                 the promoted version, written last
 *   models/_bases/<sha256>-<size>/...          a base shared by the split versions of that base and size
 *                                              (base.json written last); "_" is never a model name
 *   cache/embeddings/<cacheKey>/<pack>.bin     embedding packs: features of images already seen
 *   runs/<name>/<version>/checkpoint.json      resumable training state, deleted on success
 *   status/<dataset>/<runId>.json              what a training run of the dataset is doing, or did
 *   locks/<name>.json                          one training run per model at a time
 *   models/<name>/capture.json                 the edge's capture settings for the model
 *   captures/<model>/...                       what the edge captured and counted (contracts/capture.ts);
 *                                              the only prefix the edge may write
 *   datasets/<name>/.edgetune/captured-applied/<model>/<id>.json
 *                                              a review decision applied to the dataset (at most once)
 *   locks/datasets/<name>.json                 one push into a dataset at a time
 *   captures/<model>/requests/<id>.json        an operator's request from the console (written by the worker)
 *   captures/<model>/outcomes/<id>.json        what became of it (written by the dispatcher; the console reads it)
 *   requests/<model>/<id>.json                 a request the dispatcher applied (at most once; outside captures/)
 *   models/<name>/<version>/export/model.onnx  the version as one ONNX file (an export-onnx request), and
 *   models/<name>/<version>/export/onnx.json   its size and sha256 (written last); not part of metadata.json
 */

import { ARTIFACT_FILES, POINTER_FILE } from "./contracts/artifact.ts";
import { MANIFEST_FILE } from "./contracts/dataset.ts";

export const keys = {
  datasetsRoot: "datasets/",
  dataset: (name: string) => `datasets/${name}/`,
  manifest: (name: string) => `datasets/${name}/${MANIFEST_FILE}`,
  base: (id: string) => `bases/${id}/`,
  baseMetadata: (id: string) => `bases/${id}/base.json`,
  modelsRoot: "models/",
  model: (name: string) => `models/${name}/`,
  version: (name: string, version: string) => `models/${name}/${version}/`,
  versionFile: (name: string, version: string, file: string) => `models/${name}/${version}/${file}`,
  metadata: (name: string, version: string) => `models/${name}/${version}/${ARTIFACT_FILES.metadata}`,
  pointer: (name: string) => `models/${name}/${POINTER_FILE}`,
  sharedBasesRoot: "models/_bases/",
  sharedBase: (sha256: string, size: number) => `models/_bases/${sha256}-${size}/`,
  sharedBaseFile: (sha256: string, size: number, file: string) => `models/_bases/${sha256}-${size}/${file}`,
  embeddingCache: (cacheKey: string) => `cache/embeddings/${cacheKey}/`,
  checkpoint: (name: string, version: string) => `runs/${name}/${version}/checkpoint.json`,
  run: (name: string, version: string) => `runs/${name}/${version}/`,
  /** A run that handed its feature extraction over to an array job (features/fan-out.ts). */
  handOver: (name: string, version: string) => `runs/${name}/${version}/handed-over.json`,
  locksRoot: "locks/",
  lock: (name: string) => `locks/${name}.json`,
  statusRoot: "status/",
  runStatuses: (dataset: string) => `status/${dataset}/`,
  runStatus: (dataset: string, runId: string) => `status/${dataset}/${runId}.json`,
  captureConfig: (model: string) => `models/${model}/capture.json`,
  capturesRoot: "captures/",
  captures: (model: string) => `captures/${model}/`,
  captureImages: (model: string) => `captures/${model}/images/`,
  captureFile: (model: string, day: string, id: string, ext: string) => `captures/${model}/images/${day}/${id}.${ext}`,
  /** A capture's record: its day is the date its id starts with (20261129T…). */
  captureRecord: (model: string, id: string) => `captures/${model}/images/${captureDayOf(id)}/${id}.json`,
  captureQuota: (model: string, day: string) => `captures/${model}/quota/${day}.json`,
  captureDecisions: (model: string) => `captures/${model}/decisions/`,
  captureDecision: (model: string, id: string) => `captures/${model}/decisions/${id}.json`,
  captureCounters: (model: string) => `captures/${model}/counters/`,
  captureCounterFile: (model: string, day: string, stamp: string) => `captures/${model}/counters/${day}/${stamp}.json`,
  captureMonitor: (model: string) => `captures/${model}/monitor.json`,
  /**
   * Written (conditionally) before a decision's image is added: a replayed decision finds it and adds
   * nothing. Outside captures/, so the edge can neither forge nor delete it; named captured-* so the
   * dispatcher's one grant under datasets/ covers it.
   */
  capturedApplied: (dataset: string, model: string, id: string) => `datasets/${dataset}/.edgetune/captured-applied/${model}/${id}.json`,
  pushLock: (dataset: string) => `locks/datasets/${dataset}.json`,
  /** Operator requests (contracts/request.ts): written by the worker, so under captures/. */
  captureRequests: (model: string) => `captures/${model}/requests/`,
  captureRequest: (model: string, id: string) => `captures/${model}/requests/${id}.json`,
  captureOutcomes: (model: string) => `captures/${model}/outcomes/`,
  captureOutcome: (model: string, id: string) => `captures/${model}/outcomes/${id}.json`,
  /** The dispatcher's claim on a request, where the worker cannot write: a copy replayed under captures/ finds it. */
  requestApplied: (model: string, id: string) => `requests/${model}/${id}.json`,
  /**
   * A version's ONNX export: beside its files (the worker may read models/, never write it), but not in
   * its metadata.json (versions are immutable; the export is derived from them, on request).
   */
  versionOnnx: (name: string, version: string) => `models/${name}/${version}/export/model.onnx`,
  versionOnnxInfo: (name: string, version: string) => `models/${name}/${version}/export/onnx.json`,
} as const;

/** The UTC day a capture id names ("20261129T101500-…" → "2026-11-29"): the folder its files are in. */
export function captureDayOf(id: string): string {
  return `${id.slice(0, 4)}-${id.slice(4, 6)}-${id.slice(6, 8)}`;
}

/**
 * True for a key of the capture layout (contracts/capture.ts): `captures/<model>/` for a valid model
 * name, then exactly one of the shapes the key builders make, with no empty, `.` or `..` segment. A
 * name carrying a slash cannot reach another model's folder: the shape would be wrong. The edge's
 * writer refuses every other key; `prefix` checks a listing prefix (`captures/<model>/<kind>/`) instead.
 */
export function isCaptureKey(key: string, prefix = false): boolean {
  const s = key.split("/");
  if (s[0] !== "captures" || !/^[a-z0-9][a-z0-9._-]{0,62}$/.test(s[1] ?? "")) return false;
  const day = (x: string | undefined) => /^\d{4}-\d{2}-\d{2}$/.test(x ?? "");
  const file = (x: string | undefined) => x !== undefined && x !== "." && x !== ".." && /^[A-Za-z0-9._-]+$/.test(x);
  const kind = s[2];
  if (prefix) {
    // captures/<model>/<kind>/, or one day of it: captures/<model>/<images|counters>/<day>/
    if (s.length === 4) return s[3] === "" && (kind === "images" || kind === "decisions" || kind === "counters" || kind === "requests" || kind === "outcomes");
    return s.length === 5 && s[4] === "" && (kind === "images" || kind === "counters") && day(s[3]);
  }
  if (kind === "images" || kind === "counters") return s.length === 5 && day(s[3]) && file(s[4]);
  if (kind === "quota") return s.length === 4 && day(s[3]?.replace(/\.json$/, "")) && s[3]?.endsWith(".json") === true;
  if (kind === "decisions" || kind === "requests" || kind === "outcomes") return s.length === 4 && file(s[3]);
  return s.length === 3 && kind === "monitor.json";
}

/** Dataset name from a manifest key, or null if the key is not a manifest. */
export function datasetNameFromManifestKey(key: string): string | null {
  const m = /^datasets\/([^/]+)\/manifest\.json$/.exec(key);
  return m ? (m[1] as string) : null;
}

/** Splits `s3://bucket/prefix/` into its parts. */
export function parseS3Url(url: string): { bucket: string; key: string } {
  const m = /^s3:\/\/([^/]+)\/?(.*)$/.exec(url);
  if (!m) throw new TypeError(`not an s3:// URL: ${url}`);
  return { bucket: m[1] as string, key: m[2] as string };
}
