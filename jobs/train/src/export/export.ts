import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { readMetadata, readPointer, readVerifiedFile } from "#shared/artifacts.ts";
import { ARTIFACT_FILES, type ArtifactMetadata } from "#shared/contracts/artifact.ts";
import { EdgetuneError, NotFoundError } from "#shared/errors.ts";
import { CLASS_MEANS_FILE, versionClassMeans } from "#shared/novelty.ts";
import type { ObjectReader } from "#shared/s3/store.ts";
import { loadModel } from "../model/io.ts";
import { OPSET, UnsupportedLayerError } from "../model/onnx.ts";
import { classifierToOnnx } from "./onnx.ts";

/** A served model with a layer the ONNX converter does not cover (an imported base, say): the tfjs export still works. */
export class ExportUnsupportedError extends EdgetuneError {
  constructor(name: string, version: string, cause: UnsupportedLayerError) {
    super(
      "export_unsupported",
      `Model ${name} ${version} has a layer that edgetune cannot write as ONNX: ${cause.layer} (${cause.what}). Export it with --format tfjs instead.`,
      { cause },
    );
  }
}

export const EXPORT_FORMATS = ["onnx", "tfjs"] as const;
export type ExportFormat = (typeof EXPORT_FORMATS)[number];

/** A version's model files, every byte verified against its metadata (and the metadata against the pointer, for the served one). */
export interface VersionFiles {
  metadata: ArtifactMetadata;
  metadataBytes: Uint8Array;
  /** model.json and its weight shards. */
  files: Map<string, Uint8Array>;
}

export async function readVersion(store: ObjectReader, name: string, version?: string): Promise<VersionFiles> {
  const pointer = await readPointer(store, name);
  const chosen = version ?? pointer?.version;
  if (!chosen) throw new NotFoundError(`Model ${name} has no served version; name one (see edgetune models ${name}).`);
  // Only the served version's metadata has a sha256 vouching for it (the pointer's); another version's is read as stored.
  // The bytes readMetadata checked are kept, so the tfjs folder holds metadata.json as stored, not re-serialised.
  const kept: { bytes?: Uint8Array } = {};
  const keeping: ObjectReader = {
    get: async (key) => {
      const bytes = await store.get(key);
      if (bytes) kept.bytes = bytes;
      return bytes;
    },
  };
  const metadata = await readMetadata(keeping, name, chosen, pointer?.version === chosen ? pointer.metadataSha256 : undefined);
  const modelPaths = metadata.files.map((f) => f.path).filter((p) => p !== ARTIFACT_FILES.report && p !== ARTIFACT_FILES.reportHtml);
  const files = new Map(await Promise.all(modelPaths.map(async (p) => [p, await readVerifiedFile(store, metadata, p)] as const)));
  return { metadata, metadataBytes: kept.bytes as Uint8Array, files };
}

/** The served classifier as ONNX bytes (export/onnx.ts), from the tfjs files the edge loads. */
export async function onnxOf(version: VersionFiles): Promise<Uint8Array> {
  const model = await loadModel(version.files.get(ARTIFACT_FILES.model) as Uint8Array, version.files);
  try {
    // Without its file (only a hand-made version lacks it: readVersion verifies every listed file) the export has no similarity output.
    const means = version.files.has(CLASS_MEANS_FILE) ? versionClassMeans(version.metadata, version.files) : undefined;
    return classifierToOnnx(model, version.metadata, means);
  } catch (e) {
    if (e instanceof UnsupportedLayerError) throw new ExportUnsupportedError(version.metadata.name, version.metadata.version, e);
    throw e;
  } finally {
    model.dispose();
  }
}

export interface ExportResult {
  model: string;
  version: string;
  format: ExportFormat;
  /** The file (onnx) or folder (tfjs) written. */
  path: string;
  bytes: number;
  labels: string[];
  inputSize: number;
  opset?: number;
  ms: number;
}

/** Writes `name`'s `version` (default: the served one) as one ONNX file, or as a folder of the tfjs files with metadata.json. */
export async function exportModel(store: ObjectReader, name: string, options: { version?: string; format: ExportFormat; out?: string }): Promise<ExportResult> {
  const started = performance.now();
  const version = await readVersion(store, name, options.version);
  const { metadata } = version;
  const base = { model: name, version: metadata.version, format: options.format, labels: metadata.labels, inputSize: metadata.input.size };
  if (options.format === "onnx") {
    const bytes = await onnxOf(version);
    const path = options.out ?? `${name}-${metadata.version}.onnx`;
    await writeFile(path, bytes);
    return { ...base, path, bytes: bytes.byteLength, opset: OPSET, ms: performance.now() - started };
  }
  const path = options.out ?? `${name}-${metadata.version}-tfjs`;
  await mkdir(path, { recursive: true });
  let bytes = 0;
  for (const [file, data] of [...version.files, [ARTIFACT_FILES.metadata, version.metadataBytes] as const]) {
    await writeFile(join(path, file), data);
    bytes += data.byteLength;
  }
  return { ...base, path, bytes, ms: performance.now() - started };
}
