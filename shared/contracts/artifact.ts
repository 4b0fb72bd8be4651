import { z } from "zod";
import { ContractError } from "../errors.ts";
import { CLASS_MEANS_FILE } from "../novelty.ts";
import { preprocessingSchema } from "../preprocess.ts";
import { baseIdSchema } from "./base.ts";
import { imageSizeSchema, nameSchema, sha256Schema, strategySchema, versionSchema } from "./common.ts";
import { labelSchema } from "./dataset.ts";

/**
 * Model artifact contract.
 *
 * `models/<name>/<version>/` holds `model.json`, its weight shards, `report.json`, `report.html` and,
 * written after all of them, `metadata.json`, which lists every other file with its sha256. Versions
 * are immutable. `models/<name>/current.json` points at the promoted version and is written last, so
 * a reader that follows the pointer never sees a half-written version.
 */
export const ARTIFACT_FILES = { model: "model.json", metadata: "metadata.json", report: "report.json", reportHtml: "report.html" } as const;
export const POINTER_FILE = "current.json";
/**
 * The split form of a head-strategy version (ARCHITECTURE.md "One base, many models"): besides the whole
 * classifier, the version holds its head (pooled features → probabilities) and names a shared base,
 * published once per (base sha256, input size) under `models/_bases/` and verified by its `base.json`.
 */
export const SPLIT_FILES = { head: "head.json", headWeights: "head-shard1of1.bin", baseManifest: "base.json" } as const;

export const artifactFileSchema = z.object({
  path: z
    .string()
    .regex(/^[A-Za-z0-9._-]+$/, "must be a plain file name inside the version folder")
    .refine((p) => p !== ARTIFACT_FILES.metadata, "cannot list metadata.json itself"),
  sha256: sha256Schema,
  bytes: z.number().int().min(0),
});

export const classMetricsSchema = z.object({ precision: z.number(), recall: z.number(), f1: z.number(), support: z.number().int() });

export const metricsSchema = z.object({
  accuracy: z.number().min(0).max(1),
  /** Loss on the held-out split. */
  loss: z.number().optional(),
  evaluatedOn: z.number().int().min(0),
  perClass: z.record(z.string(), classMetricsSchema).default({}),
  /** Held-out answers by top-1 score, 10 bins from [0, 0.1) to [0.9, 1]: what the edge's traffic is compared with. */
  confidence: z.array(z.number().int().min(0)).length(10).optional(),
  /**
   * Which held-out images these numbers are about (shared/held-out.ts): two versions with the same one were
   * measured on the same images with the same labels. Absent in versions trained before it was recorded.
   */
  heldOutSha256: sha256Schema.optional(),
  /**
   * Held-out answers, rows: true label, columns: predicted, in the order of `labels`: what the console's
   * comparison shows without reading two reports. Absent in versions trained before it was recorded and for
   * models of more than MAX_CONFUSION_LABELS labels (the worker holds every loaded model's metadata).
   */
  confusion: z.array(z.array(z.number().int().min(0))).optional(),
});
/** Up to this many labels the confusion matrix (labels² counts, ≤ 1024) is recorded in the metadata too. */
export const MAX_CONFUSION_LABELS = 32;
export type Metrics = z.output<typeof metricsSchema>;

export const artifactMetadataSchema = z
  .object({
    schemaVersion: z.literal(1),
    name: nameSchema,
    version: versionSchema,
    createdAt: z.iso.datetime(),
    /** Labels in the order of the model's output units. */
    labels: z.array(labelSchema).min(2, "must list at least 2 labels"),
    input: z.object({ size: imageSizeSchema, channels: z.literal(3) }),
    preprocessing: preprocessingSchema,
    base: z.object({
      id: baseIdSchema,
      sha256: sha256Schema,
      featureLayer: z.string().min(1),
      /** Mid-level layers pooled and concatenated before the feature layer's (features from several layers); absent: that layer alone. */
      pooledLayers: z.array(z.string().min(1)).optional(),
      /** How the base was chosen when the run asked for `auto`: what was asked and why this one. */
      choice: z.object({ requested: z.string(), reason: z.string() }).optional(),
    }),
    strategy: strategySchema,
    hyperparameters: z.record(z.string(), z.union([z.string(), z.number(), z.boolean(), z.null()])),
    dataset: z.object({
      name: nameSchema,
      fingerprint: sha256Schema,
      images: z.number().int().min(0),
      skipped: z.number().int().min(0),
    }),
    metrics: metricsSchema,
    /**
     * Temperature scaling fitted on the held-out split (cross-fitted for the ECE after) and already folded
     * into the model's last layer: the scores the model gives are the calibrated ones. Absent: uncalibrated (older versions).
     */
    calibration: z
      .object({
        method: z.literal("temperature"),
        temperature: z.number().positive(),
        folds: z.number().int().min(1),
        eceBefore: z.number().min(0).max(1),
        eceAfter: z.number().min(0).max(1),
      })
      .optional(),
    /** Per-label score thresholds (calibrated scores): below its label's threshold an answer is "unsure". Absent: none (older versions). */
    thresholds: z
      .object({
        policy: z.string().min(1),
        byLabel: z.record(z.string(), z.number().min(0).max(1)),
        /** Cross-fitted on the held-out split: share of the images of real labels given a label, and accuracy over those. */
        answered: z.number().min(0).max(1).optional(),
        answeredAccuracy: z.number().min(0).max(1).optional(),
        /** With a none-of-these class: share of its held-out images given no label. */
        negativesRejected: z.number().min(0).max(1).optional(),
      })
      .optional(),
    /** The rejection class ("none of these"): a label of the model that is reported as no label. */
    noneLabel: labelSchema.optional(),
    /**
     * "None of these" by the image's features (shared/novelty.ts): below `floor`, the cosine of its pooled
     * features to the nearest label's mean direction (`class-means.bin`, one row per label but `noneLabel`),
     * the answer is none of these. Absent: versions trained before it, or turned off (`--novelty-reject 0`).
     */
    novelty: z
      .object({
        method: z.literal("cosine-class-mean"),
        /** Rows (labels but the rejection class) and width (the pooled features) of the file. */
        rows: z.number().int().min(1),
        features: z.number().int().min(1),
        floor: z.number().min(-1).max(1),
        /** Share of the labels' held-out images below the floor (what the floor was fitted to reject). */
        heldOutRejected: z.number().min(0).max(1),
      })
      .optional(),
    /** How the weights are stored, for people and the size budget. */
    weights: z.object({ dtype: z.enum(["float32", "float16", "uint8"]), bytes: z.number().int().min(0) }),
    libraries: z.record(z.string(), z.string()),
    files: z.array(artifactFileSchema).min(2, "must list model.json and at least one weight shard"),
    /**
     * Present when the version can also be served as a head on a shared base (absent: whole model only,
     * as every version before it). The base is `keys.sharedBase(base.sha256, input.size)`.
     */
    split: z
      .object({
        /** sha256 of the shared base's base.json: the root of trust for the base's files, as metadataSha256 is for this version's. */
        baseManifestSha256: sha256Schema,
        /** Length of the feature vector the head takes: pooledLayers, then featureLayer, each averaged over space. */
        features: z.number().int().min(1),
      })
      .optional(),
  })
  .superRefine((m, ctx) => {
    const seen = new Set<string>();
    m.labels.forEach((label, i) => {
      if (seen.has(label)) ctx.addIssue({ code: "custom", path: ["labels", i], message: `must be unique ("${label}" repeats)` });
      seen.add(label);
    });
    if (m.noneLabel !== undefined && !m.labels.includes(m.noneLabel))
      ctx.addIssue({ code: "custom", path: ["noneLabel"], message: `must be one of the labels ("${m.noneLabel}" is not)` });
    if (!m.files.some((f) => f.path === ARTIFACT_FILES.model)) {
      ctx.addIssue({ code: "custom", path: ["files"], message: "must include model.json" });
    }
    if (m.novelty && !m.files.some((f) => f.path === CLASS_MEANS_FILE))
      ctx.addIssue({ code: "custom", path: ["files"], message: `must include ${CLASS_MEANS_FILE} when the version has a novelty floor` });
    if (m.novelty && m.novelty.rows !== m.labels.length - (m.noneLabel === undefined ? 0 : 1))
      ctx.addIssue({ code: "custom", path: ["novelty", "rows"], message: "must be the number of labels but the rejection class" });
    if (m.split && !m.files.some((f) => f.path === SPLIT_FILES.head)) {
      ctx.addIssue({ code: "custom", path: ["files"], message: `must include ${SPLIT_FILES.head} when the version names a shared base` });
    }
  });
export type ArtifactMetadata = z.output<typeof artifactMetadataSchema>;

/**
 * How long an edge isolate trusts the pointer it read (the worker's POINTER_TTL_SECONDS unless a deploy
 * sets another): the longest a promotion or rollback takes to reach every isolate.
 */
export const DEFAULT_POINTER_TTL_SECONDS = 30;

/**
 * `models/_bases/<base sha256>-<size>/base.json`: a base cut at its feature layer with its input fixed
 * to `size`, shared by every split version of that base and size. Written once, after its files, with
 * a conditional put; its bytes depend only on the base and the size, so two writers agree.
 */
export const sharedBaseSchema = z
  .object({
    schemaVersion: z.literal(1),
    base: z.object({ id: baseIdSchema, sha256: sha256Schema, featureLayer: z.string().min(1) }),
    input: z.object({ size: imageSizeSchema, channels: z.literal(3) }),
    files: z.array(artifactFileSchema).min(2, "must list model.json and at least one weight shard"),
  })
  .refine((m) => m.files.some((f) => f.path === ARTIFACT_FILES.model), { path: ["files"], message: "must include model.json" });
export type SharedBaseManifest = z.output<typeof sharedBaseSchema>;

/**
 * What a worker fetches to serve a version, as its metadata lists it (`servedFiles`): a split version's
 * head files and the shared base they run on, or a whole model's files. Copied into the pointer so a
 * worker fetches them beside the metadata, not after it (ARCHITECTURE.md "One base, many models").
 * At most `MAX_SERVED_FILES`: a worker fetches them all at once before it can check them.
 */
export const MAX_SERVED_FILES = 16;
const servedFilesSchema = z.array(artifactFileSchema).min(1).max(MAX_SERVED_FILES);
export const servedSchema = z.discriminatedUnion("form", [
  z.object({
    form: z.literal("split"),
    files: servedFilesSchema,
    base: z.object({ sha256: sha256Schema, size: imageSizeSchema, manifestSha256: sha256Schema }),
  }),
  z.object({ form: z.literal("whole"), files: servedFilesSchema }),
]);
export type Served = z.output<typeof servedSchema>;

export const pointerSchema = z.object({
  schemaVersion: z.literal(1),
  version: versionSchema,
  /** sha256 of the version's metadata.json: the root of trust for everything it lists. */
  metadataSha256: sha256Schema,
  promotedAt: z.iso.datetime(),
  /** The version this one replaced, for rollback and the audit trail. */
  previous: versionSchema.nullable(),
  reason: z.string(),
  /** The versions served before this one, newest first (what `rollback` walks back through). */
  history: z.array(versionSchema).max(50).optional(),
  /**
   * The dataset the model belongs to (the one that created it, or took it over by an operator's explicit
   * act: `edgetune train --take-over`). Pointers written before it existed: the served version's dataset.
   */
  dataset: nameSchema.optional(),
  /**
   * A copy of `servedFiles(metadata)`: lets a worker fetch the head's files beside the metadata. The metadata
   * stays the root of trust: a worker uses what it fetched this way only if it equals what the metadata says,
   * else it fetches what the metadata lists. Absent (pointers written before it), or in a shape this code
   * does not know (a later form): read as absent, so the pointer stays readable; the metadata first, then the files.
   */
  served: servedSchema.optional().catch(undefined),
});
export type ModelPointer = z.output<typeof pointerSchema>;

/**
 * The files a worker fetches to serve `metadata`'s version: a split version's head (head.json and its
 * shard) and the base it names; otherwise the whole model (every listed file but the reports and the head).
 */
export function servedFiles(metadata: ArtifactMetadata): Served {
  const pick = (keep: (path: string) => boolean) => metadata.files.filter((f) => keep(f.path)).map((f) => ({ ...f }));
  if (metadata.split)
    return {
      form: "split",
      files: pick((p) => p === SPLIT_FILES.head || p === SPLIT_FILES.headWeights || p === CLASS_MEANS_FILE),
      base: { sha256: metadata.base.sha256, size: metadata.input.size, manifestSha256: metadata.split.baseManifestSha256 },
    };
  const skip = new Set<string>([ARTIFACT_FILES.report, ARTIFACT_FILES.reportHtml, ...Object.values(SPLIT_FILES)]);
  return { form: "whole", files: pick((p) => !skip.has(p)) };
}

/** Whether a pointer's `served` says exactly what its metadata does (same form, base, files, sha256 and sizes). */
export function sameServed(a: Served, b: Served): boolean {
  const canon = (s: Served) =>
    JSON.stringify({
      form: s.form,
      base: s.form === "split" ? [s.base.sha256, s.base.size, s.base.manifestSha256] : null,
      files: s.files.map((f) => [f.path, f.sha256, f.bytes]).sort(),
    });
  return canon(a) === canon(b);
}

/** Checks that the files a loader is about to use are exactly the ones `metadata` lists. */
export function assertFileListed(metadata: ArtifactMetadata, path: string): { sha256: string; bytes: number } {
  const file = metadata.files.find((f) => f.path === path);
  if (!file) throw new ContractError("model metadata", "files", `does not list ${path}, which model.json needs`);
  return file;
}
