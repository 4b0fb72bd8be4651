import { readdir, readFile, stat } from "node:fs/promises";
import { join, relative, sep } from "node:path";
import { pMapIterable } from "p-map";
import { HISTORY, historyOf, readMetadata, readPointerBasis, writePointerIf } from "../../../../shared/artifacts.ts";
import { listModels, listVersions as listModelVersions, type VersionSummary } from "../../../../shared/catalog.ts";
import type { ModelPointer } from "../../../../shared/contracts/artifact.ts";
import { nameSchema } from "../../../../shared/contracts/common.ts";
import { classifyDatasetKeys, type DatasetManifest, IMAGE_EXTENSIONS, manifestSchema } from "../../../../shared/contracts/dataset.ts";
import { parseContract } from "../../../../shared/contracts/parse.ts";
import { EdgetuneError, NotFoundError, userMessage } from "../../../../shared/errors.ts";
import { sha256Hex } from "../../../../shared/hash.ts";
import { keys } from "../../../../shared/keys.ts";
import type { ObjectStore } from "../../../../shared/s3/store.ts";
import { decodeImage } from "../dataset/decode.ts";
import { assignSplits, checkTrainable, DEFAULT_VAL_FRACTION } from "../dataset/read.ts";

/**
 * The user-facing operations around training: push a folder as a dataset, list datasets and model
 * versions, show and move the promoted pointer.
 */

export { listModels, type VersionSummary };

/** The pointer moved between reading and writing it (another rollback, or a training run promoting). */
export class PointerMovedError extends EdgetuneError {
  constructor(name: string) {
    super(
      "pointer_moved",
      `The served version of ${name} changed while this rollback was being written; nothing was changed. See edgetune current ${name}, then try again.`,
    );
  }
}

export interface PushResult {
  uploaded: number;
  /** Files that are not images (left out). */
  skipped: string[];
  labels: Record<string, number>;
  warnings: string[];
}

/**
 * Uploads `dir` (one folder per label, or train/val splits) and writes the manifest last. Before any
 * byte is uploaded, the folder is checked with the training job's own rules and messages (layout, labels,
 * images per label) and one image per label is decoded; a folder the job would refuse is refused here.
 * `dryRun` stops after the checks.
 */
export async function pushDataset(
  store: ObjectStore,
  dir: string,
  name: string,
  manifest: Partial<DatasetManifest> = {},
  onProgress: (done: number, total: number) => void = () => {},
  options: {
    dryRun?: boolean;
    /** Runs after the images are uploaded and before the manifest (the trigger) is written. */
    beforeManifest?: () => Promise<void>;
  } = {},
): Promise<PushResult> {
  parseContract(nameSchema, name, "dataset name");
  const files = await walk(dir);
  const images = files.filter((f) => IMAGE_EXTENSIONS.some((e) => f.toLowerCase().endsWith(e)));
  const skipped = files.filter((f) => !images.includes(f));
  const { labels, warnings } = await checkFolder(dir, name, images, manifest);
  if (options.dryRun) return { uploaded: 0, skipped, labels, warnings };
  const upload = async (f: string) => {
    const rel = relative(dir, f).split(sep).join("/");
    await store.put(keys.dataset(name) + rel, await readFile(f), contentTypeOf(f));
  };
  let done = 0;
  for await (const _ of pMapIterable(images, upload, { concurrency: 8 })) onProgress(++done, images.length);
  const full = parseContract(manifestSchema, { ...manifest, imageCount: images.length }, "manifest");
  await options.beforeManifest?.();
  await store.put(keys.manifest(name), `${JSON.stringify(full, null, 2)}\n`, "application/json");
  return { uploaded: images.length, skipped, labels, warnings };
}

/** The job's checks on a local folder: layout and labels as `readDataset` sees them, and a sample decoded. */
async function checkFolder(dir: string, name: string, images: string[], manifest: Partial<DatasetManifest>) {
  const relativeOf = (f: string) => relative(dir, f).split(sep).join("/");
  const { entries } = classifyDatasetKeys(images.map(relativeOf));
  const ignored = new Set(manifest.ignoreLabels ?? []);
  const raw = entries.flatMap((e) => (e.kind === "image" && !ignored.has(e.label) ? [{ key: e.key, id: e.key, label: e.label, split: e.split }] : []));
  const labels = [...new Set(raw.map((r) => r.label))].sort();
  const warnings = checkTrainable(name, labels, await assignSplits(raw, 42, DEFAULT_VAL_FRACTION));
  for (const label of labels) {
    const first = raw.find((r) => r.label === label) as { key: string };
    await decodeImage(new Uint8Array(await readFile(join(dir, first.key)))).catch((e: unknown) => {
      warnings.push(`${first.key} cannot be decoded (${userMessage(e)}); the job skips such files`);
    });
  }
  return { labels: Object.fromEntries(labels.map((l) => [l, raw.filter((r) => r.label === l).length])), warnings };
}

async function walk(dir: string): Promise<string[]> {
  const info = await stat(dir).catch(() => null);
  if (!info?.isDirectory()) throw new NotFoundError(`${dir} is not a folder.`);
  const out: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    if (entry.name.startsWith(".")) continue;
    const p = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...(await walk(p)));
    else if (entry.isFile()) out.push(p);
  }
  return out.sort();
}

/** The image content type for a file name (upload metadata; the worker's classify request). */
export function contentTypeOf(file: string): string {
  const ext = file.toLowerCase().split(".").pop();
  return { jpg: "image/jpeg", jpeg: "image/jpeg", png: "image/png", webp: "image/webp", gif: "image/gif" }[ext ?? ""] ?? "application/octet-stream";
}

export async function listDatasets(store: ObjectStore): Promise<{ name: string; complete: boolean; files: number }[]> {
  const byName = new Map<string, { complete: boolean; files: number }>();
  for await (const o of store.list(keys.datasetsRoot)) {
    const [name, ...rest] = o.key.slice(keys.datasetsRoot.length).split("/");
    if (!name) continue;
    const entry = byName.get(name) ?? { complete: false, files: 0 };
    if (rest.join("/") === "manifest.json") entry.complete = true;
    else entry.files++;
    byName.set(name, entry);
  }
  return [...byName.entries()].map(([name, v]) => ({ name, ...v }));
}

/** The model's versions; a name with neither pointer nor versions is an error listing the models there are. */
export async function listVersions(store: ObjectStore, name: string): ReturnType<typeof listModelVersions> {
  const found = await listModelVersions(store, name);
  if (!found.pointer && found.versions.length === 0) throw await unknownModel(store, name);
  return found;
}

/**
 * Points `current.json` at an earlier version: by default the one served before the current, and again
 * the one before that on the next call (it walks back through the pointer's history); `to` picks any
 * existing version. A compare-and-swap against the pointer it read (a training run's pointer write is
 * one too, so neither undoes the other); it does not wait for a training run's lock, which may be held
 * for hours: a rollback is what an operator needs at once. The model keeps its dataset (owner).
 * `changed: false` when `to` is already served: nothing is written.
 */
export async function rollback(store: ObjectStore, name: string, to?: string): Promise<{ pointer: ModelPointer; changed: boolean }> {
  const basis = await readPointerBasis(store, name);
  const pointer = basis.pointer;
  if (!pointer) throw await unknownModel(store, name, "has no promoted version to roll back from");
  if (to === pointer.version) return { pointer, changed: false };
  const history = historyOf(pointer);
  const target = to ?? history[0];
  if (!target) throw new NotFoundError(`Model ${name} has no earlier served version to roll back to; name one with --to (see edgetune models ${name}).`);
  const metaKey = keys.metadata(name, target);
  const bytes = await store.get(metaKey);
  if (!bytes) throw new NotFoundError(`Model ${name} has no version ${target} (see edgetune models ${name}).`);
  const targetMetadata = await readMetadata(store, name, target); // validates before pointing at it
  const owner = pointer.dataset ?? (await readMetadata(store, name, pointer.version, pointer.metadataSha256).catch(() => targetMetadata)).dataset.name;
  const written = await writePointerIf(
    store,
    name,
    {
      version: target,
      metadataSha256: await sha256Hex(bytes),
      promotedAt: new Date().toISOString(),
      previous: pointer.version,
      reason: `rollback from ${pointer.version}`,
      history: to ? [pointer.version, ...history].filter((v) => v !== target).slice(0, HISTORY) : history.slice(1),
      dataset: owner,
    },
    basis,
  );
  if (!written) throw new PointerMovedError(name);
  return { pointer: written, changed: true };
}

/** The error for a model name that is not there, listing the ones that are. */
export async function unknownModel(store: ObjectStore, name: string, what = "does not exist"): Promise<NotFoundError> {
  const models = await listModels(store);
  return new NotFoundError(`Model ${name} ${what}. ${models.length > 0 ? `Models: ${models.join(", ")}.` : "There are no models yet: push a dataset."}`);
}
