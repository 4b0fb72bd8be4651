import { historyOf, readMetadata, readPointer } from "./artifacts.ts";
import type { ArtifactMetadata, ModelPointer } from "./contracts/artifact.ts";
import { nameSchema } from "./contracts/common.ts";
import { keys } from "./keys.ts";
import type { ObjectReader } from "./s3/store.ts";

/**
 * What is in `models/`: model names and each model's versions with their metrics. The CLI reads it
 * with the SDK, the edge worker (for its console) with signed fetch; both list by folder (S3's
 * delimiter listing), so the cost is one LIST per level plus one small GET per version.
 */
export interface FolderLister extends ObjectReader {
  /**
   * The immediate sub-folders of `prefix` (which ends in "/"), as full prefixes ending in "/", in the
   * store's (byte) order; `startAfter`: only those after that key. Pages are fetched as they are
   * consumed, so a caller that stops early pays for the pages it read.
   */
  listFolders(prefix: string, options?: FolderListing): AsyncIterable<string>;
}

export interface FolderListing {
  startAfter?: string;
}

export interface VersionSummary {
  version: string;
  createdAt: string;
  accuracy: number;
  evaluatedOn: number;
  strategy: string;
  base: string;
  images: number;
  /** The version `current.json` points at. */
  current: boolean;
}

/**
 * Versions, oldest first; a version whose metadata is missing (being written) or invalid is left out.
 * `limit` bounds the metadata reads (the edge has a subrequest budget): the served version and its
 * history come first, then the others in listing order.
 */
export async function listVersions(
  store: FolderLister,
  name: string,
  limit = Number.POSITIVE_INFINITY,
): Promise<{ pointer: ModelPointer | null; versions: VersionSummary[]; truncated: boolean }> {
  const pointer = await readPointer(store, name);
  const listed: string[] = [];
  for await (const prefix of store.listFolders(keys.model(name))) {
    const m = /^models\/[^/]+\/(v[0-9a-f]{12})\/$/.exec(prefix);
    if (m) listed.push(m[1] as string);
  }
  const served = pointer ? [pointer.version, ...historyOf(pointer)] : [];
  const ordered = [...new Set([...served.filter((v) => listed.includes(v)), ...listed])];
  const folders = ordered.slice(0, limit);
  const metas = await Promise.all(folders.map((v) => readMetadata(store, name, v).catch(() => null)));
  const versions = metas
    .filter((m): m is ArtifactMetadata => m !== null)
    .map((meta) => ({
      version: meta.version,
      createdAt: meta.createdAt,
      accuracy: meta.metrics.accuracy,
      evaluatedOn: meta.metrics.evaluatedOn,
      strategy: meta.strategy,
      base: meta.base.id,
      images: meta.dataset.images,
      current: pointer?.version === meta.version,
    }))
    .sort((a, b) => a.createdAt.localeCompare(b.createdAt));
  return { pointer, versions, truncated: folders.length < ordered.length };
}

/**
 * One page of model names after `after`, in the store's order of their folders (`<name>/`): S3 lists by
 * bytes, so `a-b` and `a.b` come before `a` ('-' and '.' sort before '/'). One LIST per 1000 folders read,
 * never the whole bucket: the next page starts after `models/<after>0` ('0' is the byte after '/', so no
 * key of `after`'s own folder is listed again).
 */
export async function listModelsPage(store: FolderLister, limit: number, after?: string): Promise<{ names: string[]; more: boolean }> {
  const names: string[] = [];
  const startAfter = after === undefined ? undefined : `${keys.model(after).slice(0, -1)}0`;
  for await (const prefix of store.listFolders(keys.modelsRoot, { startAfter })) {
    const name = prefix.slice(keys.modelsRoot.length, -1);
    if (!nameSchema.safeParse(name).success) continue;
    if (names.length === limit) return { names, more: true };
    names.push(name);
  }
  return { names, more: false };
}

/** Model names (folders under `models/`), sorted. */
export async function listModels(store: FolderLister): Promise<string[]> {
  const names: string[] = [];
  for await (const prefix of store.listFolders(keys.modelsRoot)) {
    const name = prefix.slice(keys.modelsRoot.length, -1);
    // models/_bases/ holds shared bases, not a model (no model name starts with "_").
    if (nameSchema.safeParse(name).success) names.push(name);
  }
  return names.sort();
}
