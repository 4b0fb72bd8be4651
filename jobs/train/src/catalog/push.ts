import { readdir, readFile, stat } from "node:fs/promises";
import { join, relative, sep } from "node:path";
import { pMapIterable } from "p-map";
import { nameSchema } from "#shared/contracts/common.ts";
import { classifyDatasetKeys, type DatasetManifest, IMAGE_EXTENSIONS, JOB_FOLDER, MANIFEST_FILE, manifestSchema } from "#shared/contracts/dataset.ts";
import { parseContract } from "#shared/contracts/parse.ts";
import { DatasetError, EdgetuneError, NotFoundError, userMessage } from "#shared/errors.ts";
import { keys } from "#shared/keys.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import { decodeImage } from "../dataset/decode.ts";
import { assignSplits, checkTrainable, DEFAULT_VAL_FRACTION } from "../dataset/read.ts";
import { acquireLock, LockTimeoutError } from "../release/lock.ts";

export interface PushResult {
  uploaded: number;
  /** Files that are not images (left out). */
  skipped: string[];
  labels: Record<string, number>;
  warnings: string[];
  /** Dataset files the folder no longer has, removed (with `dryRun`: that would be removed), relative to the dataset. */
  removed: string[];
}

/** A second push into a dataset while one is uploading: the two would merge into one dataset silently. */
export class PushInProgressError extends EdgetuneError {
  constructor(name: string) {
    super(
      "push_in_progress",
      `Another push into dataset ${name} is in progress; push again when it has finished (if none is running, its lease expires within 3 minutes).`,
    );
  }
}

/**
 * Uploads `dir` (one folder per label, or train/val splits) and writes the manifest last. Before any
 * byte is uploaded, the folder is checked with the training job's own rules and messages (layout, labels,
 * images per label) and one image per label is decoded; a folder the job would refuse is refused here.
 * `dryRun` decodes every image and stops after the checks.
 *
 * The dataset becomes what the folder holds: one push at a time (a lease on the dataset, `locks/datasets/`;
 * a second push fails and says so, rather than two folders merging into one dataset whose manifest counts
 * one of them), and files the folder no longer has are removed from the dataset — except accepted
 * captures (`captured-*`), which are not in any folder, unless `dropCaptured` — before the manifest is written.
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
    /** Also remove accepted captures (`captured-*`), which the folder does not have. */
    dropCaptured?: boolean;
  } = {},
): Promise<PushResult> {
  parseContract(nameSchema, name, `dataset name "${name}"`);
  const files = await walk(dir);
  const images = files.filter((f) => IMAGE_EXTENSIONS.some((e) => f.toLowerCase().endsWith(e)));
  const skipped = files.filter((f) => !images.includes(f));
  const { labels, warnings } = await checkFolder(dir, name, images, manifest, options.dryRun);
  const rel = (f: string) => relative(dir, f).split(sep).join("/");
  const wanted = new Set(images.map(rel));
  if (options.dryRun) return { uploaded: 0, skipped, labels, warnings, removed: await staleFiles(store, name, wanted, options.dropCaptured) };
  // The lease's key is a lock key of its own (locks/datasets/<name>.json): no model's training lock.
  const lease = await acquireLock(store, `datasets/${name}`, { waitMs: 0 }).catch((e: unknown) => {
    throw e instanceof LockTimeoutError ? new PushInProgressError(name) : e;
  });
  try {
    const upload = async (f: string) => {
      await store.put(keys.dataset(name) + rel(f), await readFile(f), contentTypeOf(f));
    };
    let done = 0;
    for await (const _ of pMapIterable(images, upload, { concurrency: 8 })) onProgress(++done, images.length);
    const removed = await staleFiles(store, name, wanted, options.dropCaptured);
    if (removed.length > 0) await store.delete(removed.map((r) => keys.dataset(name) + r));
    const full = parseContract(manifestSchema, { ...manifest, imageCount: images.length }, "manifest");
    await options.beforeManifest?.();
    await store.put(keys.manifest(name), `${JSON.stringify(full, null, 2)}\n`, "application/json");
    return { uploaded: images.length, skipped, labels, warnings, removed };
  } finally {
    await lease.release();
  }
}

/** Files of the dataset that the pushed folder does not have (the manifest and job records aside). */
async function staleFiles(store: ObjectStore, name: string, wanted: ReadonlySet<string>, dropCaptured = false): Promise<string[]> {
  const out: string[] = [];
  for await (const o of store.list(keys.dataset(name))) {
    const r = o.key.slice(keys.dataset(name).length);
    if (r === MANIFEST_FILE || r.startsWith(JOB_FOLDER) || wanted.has(r)) continue;
    if (!dropCaptured && (r.split("/").pop() ?? "").startsWith("captured-")) continue;
    out.push(r);
  }
  return out;
}

/**
 * The job's checks on a local folder: layout and labels as `readDataset` sees them, and images decoded as
 * the job decodes them: every image with `decodeAll` (`--dry-run`), else the first of each label. A file
 * found undecodable is not counted in its label (the job skips it) and is named in a warning.
 */
async function checkFolder(dir: string, name: string, images: string[], manifest: Partial<DatasetManifest>, decodeAll = false) {
  const relativeOf = (f: string) => relative(dir, f).split(sep).join("/");
  const { entries } = classifyDatasetKeys(images.map(relativeOf));
  // The out-of-distribution folder is not a label (readDataset sets it aside).
  const ignored = new Set([...(manifest.ignoreLabels ?? []), ...(manifest.oodFolder ? [manifest.oodFolder] : [])]);
  const found = entries.flatMap((e) => (e.kind === "image" && !ignored.has(e.label) ? [{ key: e.key, id: e.key, label: e.label, split: e.split }] : []));
  // Named as the user knows it: the local folder, not the S3 keys it would become.
  if (found.length === 0)
    throw new DatasetError(
      `${dir} has no images to push (${IMAGE_EXTENSIONS.join(", ")}). Put them in one sub-folder per label: ${join(dir, "<label>", "<image>.jpg")}`,
    );
  const firsts = new Set<string>();
  const sample = decodeAll ? found : found.filter((r) => !firsts.has(r.label) && firsts.add(r.label));
  const undecodable = new Map<string, string>();
  for await (const failure of pMapIterable(
    sample,
    async (r) => {
      try {
        await decodeImage(new Uint8Array(await readFile(join(dir, r.key))));
        return null;
      } catch (e) {
        return { key: r.key, reason: userMessage(e) };
      }
    },
    { concurrency: 2 },
  ))
    if (failure) undecodable.set(failure.key, failure.reason);
  const raw = found.filter((r) => !undecodable.has(r.key));
  const labels = [...new Set(raw.map((r) => r.label))].sort();
  const warnings = checkTrainable(name, labels, await assignSplits(raw, 42, DEFAULT_VAL_FRACTION));
  const named = [...undecodable].slice(0, 5).map(([key, reason]) => `${key} (${reason})`);
  if (undecodable.size > 0)
    warnings.push(
      `${undecodable.size} file(s) cannot be decoded and are not counted; the job skips such files: ${named.join(", ")}${undecodable.size > named.length ? ` and ${undecodable.size - named.length} more` : ""}`,
    );
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
