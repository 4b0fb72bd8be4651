import { HISTORY, historyOf, readMetadata, readPointerBasis, writePointerIf } from "#shared/artifacts.ts";
import { listModels, listVersions as listModelVersions, type VersionSummary } from "#shared/catalog.ts";
import { type ModelPointer, servedFiles } from "#shared/contracts/artifact.ts";
import { EdgetuneError, NotFoundError } from "#shared/errors.ts";
import { sha256Hex } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import { acquireLock, LockTimeoutError } from "../release/lock.ts";

/**
 * The user-facing operations around training: push a folder as a dataset (push.ts), list datasets and model
 * versions, show and move the promoted pointer.
 */

export { contentTypeOf, type PushResult, pushDataset } from "./push.ts";
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
 * existing version. It takes the model's lock when it is free; a training run may hold it for hours, and
 * a rollback is needed at once, so then it goes ahead without it (`duringRun`): the write is a
 * compare-and-swap against the pointer it read, and so is the run's, so neither undoes the other (the
 * run ends not promoted). The model keeps its dataset (owner). `changed: false` when `to` is already
 * served: nothing is written.
 */
export async function rollback(
  store: ObjectStore,
  name: string,
  to?: string,
  expected?: ExpectedPointer,
): Promise<{ pointer: ModelPointer; changed: boolean; duringRun: boolean }> {
  const lock = await acquireLock(store, name, { waitMs: 0 }).catch((e: unknown) => {
    if (e instanceof LockTimeoutError) return null;
    throw e;
  });
  try {
    return { ...(await moveBack(store, name, to, expected)), duringRun: lock === null };
  } finally {
    await lock?.release();
  }
}

/** What a console request saw when it was asked (requests/requests.ts): the pointer must still look so. */
export interface ExpectedPointer {
  /** The version served then, and its pointer's promotedAt (a pointer moved away and back is another one). */
  from: string;
  promotedAt: string;
  /** Where a plain rollback went then (history[0]). */
  target?: string;
}

/** The served version is no longer what the request was asked against: nothing is changed. */
export class ServedVersionChangedError extends EdgetuneError {
  constructor(name: string, expected: string, now: string) {
    super(
      "served_version_changed",
      `${name} served ${expected} when this was asked and serves ${now === expected ? `${now} again (served anew since)` : now} now: nothing was changed (asked twice, or replayed). Ask again if it is still wanted.`,
    );
  }
}

async function moveBack(store: ObjectStore, name: string, to?: string, expected?: ExpectedPointer): Promise<{ pointer: ModelPointer; changed: boolean }> {
  const basis = await readPointerBasis(store, name);
  const pointer = basis.pointer;
  if (!pointer) throw await unknownModel(store, name, "has no promoted version to roll back from");
  const history = historyOf(pointer);
  // Checked on the pointer the compare-and-swap below writes against: no window in between.
  if (
    expected &&
    (pointer.version !== expected.from ||
      pointer.promotedAt !== expected.promotedAt ||
      (expected.target !== undefined && (to ?? history[0]) !== expected.target))
  )
    throw new ServedVersionChangedError(name, expected.from, pointer.version);
  if (to === pointer.version) return { pointer, changed: false };
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
      served: servedFiles(targetMetadata),
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
