import { readMetadata, readPointer, readVerifiedFile } from "#shared/artifacts.ts";
import { ARTIFACT_FILES, type ArtifactMetadata } from "#shared/contracts/artifact.ts";
import { IntegrityError, NotFoundError } from "#shared/errors.ts";
import { compareHeldOut, type HeldOutComparison } from "#shared/held-out.ts";
import { keys } from "#shared/keys.ts";
import { type ObjectReader, ObjectTooLargeError } from "#shared/s3/store.ts";
import { ApiError } from "../http/errors.ts";
import type { ModelSource } from "../model/source.ts";

/**
 * Two versions of a model side by side for the console (Custom Vision's iterations): each one's
 * accuracy, per-label metrics and confusion matrix, and whether both were measured on the same held-out
 * images. Three subrequests: the pointer and both metadata files, which hold the confusion matrix since
 * it is recorded there (metrics.confusion). Older versions (and models of many labels) have it only in their
 * report: that one is read too, bounded and checked against the version's sha256 list, and one that cannot
 * be read leaves that matrix empty with a note, not the comparison failed.
 */
export interface ComparedVersion {
  version: string;
  createdAt: string;
  current: boolean;
  labels: string[];
  accuracy: number;
  evaluatedOn: number;
  perClass: ArtifactMetadata["metrics"]["perClass"];
  confusion: number[][];
  /** Why `confusion` is empty, where it could not be read. */
  note?: string;
  heldOutSha256: string | null;
  dataset: { name: string; fingerprint: string; images: number };
  strategy: string;
  base: string;
}

/**
 * A report holds 12 thumbnails and one score per held-out image (about 20 bytes each): 8 MB is far above
 * any real one, and bounds what one request holds in memory (two of them here).
 */
export const MAX_REPORT_BYTES = 8 * 1024 * 1024;

export async function compareVersions(
  source: ModelSource,
  name: string,
  a: string,
  b: string,
): Promise<{ model: string; versions: [ComparedVersion, ComparedVersion]; heldOut: HeldOutComparison }> {
  // An unreadable pointer only loses the "served" marks, not the comparison.
  const [pointer, first, second] = await Promise.all([
    readPointer(source, name).catch(() => null),
    versionNumbers(source, name, a),
    versionNumbers(source, name, b),
  ]);
  const versions: [ComparedVersion, ComparedVersion] = [
    { ...first, current: pointer?.version === a },
    { ...second, current: pointer?.version === b },
  ];
  const heldOut = compareHeldOut(heldOutOf(versions[0]), heldOutOf(versions[1]));
  return { model: name, versions, heldOut };
}

/**
 * A version's report, verified, or a 404 / 422 that says which. Never more than the listed bytes are read
 * (a store object larger than its listing is refused while it streams, before it is held whole).
 */
export async function readReport(source: ModelSource, metadata: ArtifactMetadata): Promise<Record<string, unknown>> {
  const listed = metadata.files.find((f) => f.path === ARTIFACT_FILES.report);
  if (!listed) throw new ApiError(404, "version_not_found", `Model ${metadata.name} version ${metadata.version} has no report.`);
  if (listed.bytes > MAX_REPORT_BYTES)
    throw new ApiError(
      422,
      "report_too_large",
      `The report of ${metadata.name} ${metadata.version} is ${(listed.bytes / 2 ** 20).toFixed(1)} MB, more than the ${MAX_REPORT_BYTES / 2 ** 20} MB the worker reads; use edgetune report.`,
    );
  const bounded: ObjectReader = { get: (key) => source.get(key, { maxBytes: listed.bytes }) };
  const bytes = await readVerifiedFile(bounded, metadata, ARTIFACT_FILES.report).catch((e: unknown) => {
    // Larger than listed is not the file the metadata's sha256 names either.
    if (e instanceof ObjectTooLargeError || e instanceof IntegrityError)
      throw new ApiError(422, "report_corrupt", `The report of ${metadata.name} ${metadata.version} is not the one its metadata lists (corrupt or replaced).`);
    throw e;
  });
  return JSON.parse(new TextDecoder().decode(bytes)) as Record<string, unknown>;
}

/** A version's metadata, or the 404 that says whether the model or only the version is missing. */
export async function readVersionMetadata(source: ModelSource, name: string, version: string): Promise<ArtifactMetadata> {
  try {
    return await readMetadata(source, name, version);
  } catch (e) {
    if (!(e instanceof NotFoundError)) throw e;
    // One listing, on the error path only: a model with no folder at all is unknown.
    const folders = source.listFolders(keys.model(name))[Symbol.asyncIterator]();
    if ((await folders.next()).done) throw new ApiError(404, "model_not_found", `No model named ${name}.`);
    throw new ApiError(404, "version_not_found", `Model ${name} has no version ${version}.`);
  }
}

const heldOutOf = (v: ComparedVersion) => ({
  version: v.version,
  evaluatedOn: v.evaluatedOn,
  heldOutSha256: v.heldOutSha256 ?? undefined,
  datasetFingerprint: v.dataset.fingerprint,
});

async function versionNumbers(source: ModelSource, name: string, version: string): Promise<Omit<ComparedVersion, "current">> {
  const m = await readVersionMetadata(source, name, version);
  const { confusion, note } = m.metrics.confusion ? { confusion: m.metrics.confusion } : await confusionFromReport(source, m);
  // Written by the training job with the metadata's labels; a matrix of another shape is not shown as if it were.
  const square = Array.isArray(confusion) && confusion.length === m.labels.length && confusion.every((r) => Array.isArray(r) && r.length === m.labels.length);
  return {
    version: m.version,
    createdAt: m.createdAt,
    labels: m.labels,
    accuracy: m.metrics.accuracy,
    evaluatedOn: m.metrics.evaluatedOn,
    perClass: m.metrics.perClass,
    confusion: square ? (confusion as number[][]) : [],
    ...(note ? { note } : {}),
    heldOutSha256: m.metrics.heldOutSha256 ?? null,
    dataset: { name: m.dataset.name, fingerprint: m.dataset.fingerprint, images: m.dataset.images },
    strategy: m.strategy,
    base: m.base.id,
  };
}

/** The matrix of a version that has it only in its report; a report that is missing or too large costs the matrix alone. */
async function confusionFromReport(source: ModelSource, m: ArtifactMetadata): Promise<{ confusion: unknown; note?: string }> {
  try {
    return { confusion: (await readReport(source, m)).confusion };
  } catch (e) {
    if (e instanceof ApiError && e.status !== 500) return { confusion: [], note: e.message };
    if (e instanceof NotFoundError) return { confusion: [], note: `The report of ${m.name} ${m.version} is missing from the bucket.` };
    throw e;
  }
}
