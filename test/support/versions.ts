import { readPromotedModel, writeArtifact, writePointer } from "#shared/artifacts.ts";
import { type ArtifactMetadata, type Served, servedFiles } from "#shared/contracts/artifact.ts";
import type { ObjectStore } from "#shared/s3/store.ts";

type Metadata = Omit<ArtifactMetadata, "files">;

/**
 * The promoted version of `from`, published again as the served version of model `name`: its metadata
 * changed by `edit` (the version's own files kept, but those in `drop`), and a pointer whose `served` is
 * `serve`'s (default: what the new metadata lists; undefined: a pointer written before `served` existed).
 * For tests and benchmarks that need the same weights under other rules, forms or faults.
 */
export async function publishCopy(
  store: ObjectStore,
  from: string,
  name: string,
  options: { edit?: (m: Metadata) => Metadata; drop?: readonly string[]; serve?: (m: ArtifactMetadata) => Served | undefined } = {},
): Promise<ArtifactMetadata> {
  const source = await readPromotedModel(store, from);
  const { files: _files, ...metadata } = source.metadata;
  const drop = new Set(options.drop ?? []);
  const written = await writeArtifact(
    store,
    { ...(options.edit ?? ((m) => m))(metadata), name },
    [...source.files.entries()].filter(([path]) => !drop.has(path)).map(([path, bytes]) => ({ path, bytes })),
  );
  const served = (options.serve ?? servedFiles)(written.metadata);
  await writePointer(store, name, {
    version: written.metadata.version,
    metadataSha256: written.metadataSha256,
    promotedAt: new Date().toISOString(),
    previous: null,
    reason: `a copy of ${from}`,
    ...(served ? { served } : {}),
  });
  return written.metadata;
}
