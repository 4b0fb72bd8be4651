/**
 * The S3 key layout, in one place. Every key edgetune reads or writes is built here.
 *
 *   datasets/<name>/manifest.json              written last by the uploader: "dataset complete"
 *   datasets/<name>/[<split>/]<label>/<file>   images
 *   bases/<id>/{base.json,model.json,*.bin}    pretrained bases
 *   models/<name>/<version>/...                immutable trained versions (see contracts/artifact.ts)
 *   models/<name>/current.json                 the promoted version, written last
 *   cache/embeddings/<cacheKey>/<pack>.bin     embedding packs: features of images already seen
 *   runs/<name>/<version>/checkpoint.json      resumable training state, deleted on success
 *   status/<dataset>/<runId>.json              what a training run of the dataset is doing, or did
 *   locks/<name>.json                          one training run per model at a time
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
  embeddingCache: (cacheKey: string) => `cache/embeddings/${cacheKey}/`,
  checkpoint: (name: string, version: string) => `runs/${name}/${version}/checkpoint.json`,
  run: (name: string, version: string) => `runs/${name}/${version}/`,
  /** A run that handed its feature extraction over to an array job (features/fan-out.ts). */
  handOver: (name: string, version: string) => `runs/${name}/${version}/handed-over.json`,
  lock: (name: string) => `locks/${name}.json`,
  statusRoot: "status/",
  runStatuses: (dataset: string) => `status/${dataset}/`,
  runStatus: (dataset: string, runId: string) => `status/${dataset}/${runId}.json`,
} as const;

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
