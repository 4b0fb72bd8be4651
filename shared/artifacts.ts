import {
  ARTIFACT_FILES,
  type ArtifactMetadata,
  artifactMetadataSchema,
  type ModelPointer,
  pointerSchema,
  type SharedBaseManifest,
  SPLIT_FILES,
  sharedBaseSchema,
} from "./contracts/artifact.ts";
import { parseContract, parseContractJson } from "./contracts/parse.ts";
import { ContractError, EdgetuneError, IntegrityError, NotFoundError } from "./errors.ts";
import { sha256Hex } from "./hash.ts";
import { keys } from "./keys.ts";
import type { ObjectReader, ObjectStore } from "./s3/store.ts";

/**
 * Writing and reading model artifacts per `contracts/artifact.ts`. Both the training job and the edge
 * worker go through these functions, so "verified" means the same thing on both sides.
 */

export interface ArtifactFile {
  path: string;
  bytes: Uint8Array;
}

export class VersionExistsError extends EdgetuneError {
  constructor(name: string, version: string) {
    super("version_exists", `Model ${name} version ${version} already exists; versions are immutable.`);
  }
}

/**
 * Writes a new immutable version: every file, then `metadata.json` (listing their sha256) last,
 * with a conditional put so two writers cannot both create it. Returns the metadata and its sha256.
 */
export async function writeArtifact(
  store: ObjectStore,
  metadata: Omit<ArtifactMetadata, "files">,
  files: readonly ArtifactFile[],
): Promise<{ metadata: ArtifactMetadata; metadataSha256: string }> {
  const listed = await Promise.all(files.map(async (f) => ({ path: f.path, sha256: await sha256Hex(f.bytes), bytes: f.bytes.byteLength })));
  const full = parseContract(artifactMetadataSchema, { ...metadata, files: listed }, "model metadata");
  const metadataKey = keys.metadata(full.name, full.version);
  if (await store.head(metadataKey)) throw new VersionExistsError(full.name, full.version);
  for (const f of files) await store.put(keys.versionFile(full.name, full.version, f.path), f.bytes);
  const text = `${JSON.stringify(full, null, 2)}\n`;
  if (!(await store.putIfAbsent(metadataKey, text, "application/json"))) throw new VersionExistsError(full.name, full.version);
  return { metadata: full, metadataSha256: await sha256Hex(text) };
}

/** Points `models/<name>/current.json` at a version. The pointer is the last write of a promotion. */
export async function writePointer(store: ObjectStore, name: string, pointer: Omit<ModelPointer, "schemaVersion">): Promise<ModelPointer> {
  const full = parseContract(pointerSchema, { schemaVersion: 1, ...pointer }, "model pointer");
  await store.put(keys.pointer(name), `${JSON.stringify(full, null, 2)}\n`, "application/json");
  return full;
}

/** The pointer as a writer read it: what it said and its ETag (null: there was none), for `writePointerIf`. */
export interface PointerBasis {
  pointer: ModelPointer | null;
  etag: string | null;
}

/**
 * Reads the pointer with its ETag. HEAD before GET: if the pointer moves in between, the ETag is the
 * older one and a later compare-and-swap fails (safe), never the other way round.
 */
export async function readPointerBasis(store: ObjectStore, name: string): Promise<PointerBasis> {
  const head = await store.head(keys.pointer(name));
  if (!head) return { pointer: null, etag: null };
  const pointer = await readPointer(store, name);
  return { pointer, etag: pointer ? head.etag : null };
}

/**
 * Moves the pointer only if it is still what `basis` read (S3 `If-Match` on its ETag, or `If-None-Match`
 * when there was none): a compare-and-swap, so a writer that compared itself with one served version
 * cannot overwrite another that someone put there meanwhile (a rollback during a training run). Null when
 * the pointer changed; the caller says what it found instead.
 */
export async function writePointerIf(
  store: ObjectStore,
  name: string,
  pointer: Omit<ModelPointer, "schemaVersion">,
  basis: PointerBasis,
): Promise<ModelPointer | null> {
  const full = parseContract(pointerSchema, { schemaVersion: 1, ...pointer }, "model pointer");
  const text = `${JSON.stringify(full, null, 2)}\n`;
  const written =
    basis.etag === null
      ? await store.putIfAbsent(keys.pointer(name), text, "application/json")
      : await store.putIfMatch(keys.pointer(name), text, basis.etag, "application/json");
  if (written) return full;
  // A retried request whose first attempt did write (its answer lost) fails its own condition: that is ours.
  const now = await readPointer(store, name).catch(() => null);
  return now?.version === full.version && now.promotedAt === full.promotedAt && now.metadataSha256 === full.metadataSha256 ? full : null;
}

/** Versions kept in a pointer's history. */
export const HISTORY = 20;

/** The versions served before the pointer's, newest first (pointers written before `history` existed: `previous`). */
export function historyOf(pointer: ModelPointer): string[] {
  return pointer.history ?? (pointer.previous ? [pointer.previous] : []);
}

/** The current pointer, or null when no version was ever promoted. */
export async function readPointer(store: ObjectReader, name: string): Promise<ModelPointer | null> {
  const bytes = await store.get(keys.pointer(name));
  if (bytes === null) return null;
  return parseContractJson(pointerSchema, new TextDecoder().decode(bytes), `models/${name}/current.json`);
}

/**
 * Verified bytes kept by their sha256 (content-addressed), e.g. the Workers Cache API, so a fresh edge
 * isolate does not fetch a model from the bucket again. A hit is hashed again before use: a bad entry
 * can cost a fetch, never serve wrong bytes. Only bytes that passed verification are put.
 */
export interface VerifiedBytesCache {
  get(sha256: string): Promise<Uint8Array | null>;
  put(sha256: string, bytes: Uint8Array): Promise<void>;
}

/** `sha256`'s bytes from the cache if present and intact; otherwise `fetch` them (the caller verifies). */
async function cachedOr(
  cache: VerifiedBytesCache | undefined,
  sha256: string,
  fetch: () => Promise<Uint8Array | null>,
): Promise<{ bytes: Uint8Array | null; hit: boolean }> {
  const hit = cache ? await cache.get(sha256).catch(() => null) : null;
  if (hit && (await sha256Hex(hit)) === sha256) return { bytes: hit, hit: true };
  return { bytes: await fetch(), hit: false };
}

/** Keeps verified bytes; a cache that fails only costs the next isolate a fetch. */
async function remember(cache: VerifiedBytesCache | undefined, sha256: string, bytes: Uint8Array): Promise<void> {
  await cache?.put(sha256, bytes).catch(() => {});
}

/** Reads a version's metadata; if `expectedSha256` is given (from a pointer) the bytes must match it. */
export async function readMetadata(
  store: ObjectReader,
  name: string,
  version: string,
  expectedSha256?: string,
  cache?: VerifiedBytesCache,
): Promise<ArtifactMetadata> {
  const key = keys.metadata(name, version);
  const { bytes, hit } = expectedSha256 ? await cachedOr(cache, expectedSha256, () => store.get(key)) : { bytes: await store.get(key), hit: false };
  if (bytes === null) throw new NotFoundError(`Model ${name} has no version ${version} (${key} is missing).`);
  if (expectedSha256 && !hit) {
    const actual = await sha256Hex(bytes);
    if (actual !== expectedSha256) throw new IntegrityError(key, expectedSha256, actual);
    await remember(cache, expectedSha256, bytes);
  }
  const metadata = parseContractJson(artifactMetadataSchema, new TextDecoder().decode(bytes), key);
  if (metadata.name !== name || metadata.version !== version) {
    throw new ContractError(key, "version", `says ${metadata.name}/${metadata.version}, but the file sits at ${name}/${version}`);
  }
  return metadata;
}

/** Fetches one listed file and checks its size and sha256. */
export async function readVerifiedFile(store: ObjectReader, metadata: ArtifactMetadata, path: string, cache?: VerifiedBytesCache): Promise<Uint8Array> {
  const file = metadata.files.find((f) => f.path === path);
  if (!file) throw new NotFoundError(`${path} is not part of model ${metadata.name} version ${metadata.version}.`);
  return readVerifiedKey(store, keys.versionFile(metadata.name, metadata.version, path), file.sha256, cache);
}

/** One file of a version as a pointer's `served` lists it, checked against that listing's sha256 (fetched before the metadata). */
export async function readListedFile(
  store: ObjectReader,
  name: string,
  version: string,
  file: { path: string; sha256: string },
  cache?: VerifiedBytesCache,
): Promise<Uint8Array> {
  return readVerifiedKey(store, keys.versionFile(name, version, file.path), file.sha256, cache);
}

/** The bytes at `key`, which must hash to `sha256` (from a cache when it holds them intact). */
async function readVerifiedKey(store: ObjectReader, key: string, sha256: string, cache?: VerifiedBytesCache): Promise<Uint8Array> {
  const { bytes, hit } = await cachedOr(cache, sha256, () => store.get(key));
  if (bytes === null) throw new NotFoundError(`${key} is missing.`);
  if (hit) return bytes;
  const actual = await sha256Hex(bytes);
  if (actual !== sha256) throw new IntegrityError(key, sha256, actual);
  await remember(cache, sha256, bytes);
  return bytes;
}

/**
 * Publishes a shared base once per (base sha256, size): its files, then base.json with a conditional
 * put. When base.json is already there (an earlier version, or a concurrent run) it is reused as it is:
 * its name is the base's content hash and size, so it holds the same base. Returns base.json's sha256,
 * which the versions that use it record.
 */
export async function writeSharedBase(
  store: ObjectStore,
  manifest: Omit<SharedBaseManifest, "files">,
  files: readonly ArtifactFile[],
): Promise<{ manifest: SharedBaseManifest; manifestSha256: string; written: boolean }> {
  const { sha256 } = manifest.base;
  const size = manifest.input.size;
  const key = keys.sharedBaseFile(sha256, size, SPLIT_FILES.baseManifest);
  const existing = await store.get(key);
  if (existing) return { ...parseSharedBase(existing, key), manifestSha256: await sha256Hex(existing), written: false };
  const listed = await Promise.all(files.map(async (f) => ({ path: f.path, sha256: await sha256Hex(f.bytes), bytes: f.bytes.byteLength })));
  const full = parseContract(sharedBaseSchema, { ...manifest, files: listed }, "shared base");
  for (const f of files) await store.put(keys.sharedBaseFile(sha256, size, f.path), f.bytes);
  const text = `${JSON.stringify(full, null, 2)}\n`;
  if (await store.putIfAbsent(key, text, "application/json")) return { manifest: full, manifestSha256: await sha256Hex(text), written: true };
  // Another run published it between our check and our put: theirs is the one versions point at.
  const theirs = (await store.get(key)) as Uint8Array;
  return { ...parseSharedBase(theirs, key), manifestSha256: await sha256Hex(theirs), written: false };
}

function parseSharedBase(bytes: Uint8Array, key: string): { manifest: SharedBaseManifest } {
  return { manifest: parseContractJson(sharedBaseSchema, new TextDecoder().decode(bytes), key) };
}

/**
 * The shared base a split version names, every byte verified: base.json against `manifestSha256`
 * (from the version's metadata), its files against base.json. Returns base.json and model.json with
 * its weight shards by path.
 */
export async function readSharedBase(
  store: ObjectReader,
  baseSha256: string,
  size: number,
  manifestSha256: string,
  cache?: VerifiedBytesCache,
): Promise<{ manifest: SharedBaseManifest; files: Map<string, Uint8Array> }> {
  const key = keys.sharedBaseFile(baseSha256, size, SPLIT_FILES.baseManifest);
  const { manifest } = parseSharedBase(await readVerifiedKey(store, key, manifestSha256, cache), key);
  if (manifest.base.sha256 !== baseSha256 || manifest.input.size !== size) {
    throw new ContractError(key, "base", `describes base ${manifest.base.sha256} at ${manifest.input.size} px, not ${baseSha256} at ${size} px`);
  }
  const entries = await Promise.all(
    manifest.files.map(async (f) => [f.path, await readVerifiedKey(store, keys.sharedBaseFile(baseSha256, size, f.path), f.sha256, cache)] as const),
  );
  return { manifest, files: new Map(entries) };
}

export interface VerifiedModel {
  pointer: ModelPointer;
  metadata: ArtifactMetadata;
  /** model.json and its weight shards, verified. */
  files: Map<string, Uint8Array>;
}

/**
 * Follows the pointer and returns the model files (not the reports), every byte verified against the
 * metadata that the pointer's sha256 vouches for.
 */
export async function readPromotedModel(store: ObjectReader, name: string, pointer?: ModelPointer): Promise<VerifiedModel> {
  const current = pointer ?? (await readPointer(store, name));
  if (!current) throw new NotFoundError(`Model ${name} has no promoted version yet.`);
  const metadata = await readMetadata(store, name, current.version, current.metadataSha256);
  const wanted = metadata.files.filter((f) => f.path !== ARTIFACT_FILES.report && f.path !== ARTIFACT_FILES.reportHtml);
  const entries = await Promise.all(wanted.map(async (f) => [f.path, await readVerifiedFile(store, metadata, f.path)] as const));
  return { pointer: current, metadata, files: new Map(entries) };
}
