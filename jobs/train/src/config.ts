import { readFile } from "node:fs/promises";
import { z } from "zod";
import { IMAGE_SIZES, imageSizeSchema, nameSchema, STRATEGIES, strategySchema } from "#shared/contracts/common.ts";
import type { DatasetManifest } from "#shared/contracts/dataset.ts";
import { parseContract } from "#shared/contracts/parse.ts";
import { EdgetuneError, InvalidOptionError } from "#shared/errors.ts";
import { sha256Hex } from "#shared/hash.ts";
import { AUTO_BASE } from "./model/bases.ts";

const headSchema = z.object({
  units: z.number().int().min(0).max(4096).default(0),
  /**
   * 0 since the head learns on standardised features (2026-11-29): over 4 seeds × 3 reference datasets it
   * scored as well or better than 0.2 (bench/RESULTS.md), and the input dropout's random numbers (drawn in
   * JS, one per feature and row) were 40 % of a head epoch, the largest part of a nightly retrain.
   */
  dropout: z.number().min(0).lt(1).default(0),
  learningRate: z.number().gt(0).max(1).default(1e-3),
  /** Most epochs; training stops earlier when validation loss stops improving (`patience`). */
  epochs: z.number().int().min(1).max(500).default(40),
  patience: z.number().int().min(1).max(500).default(6),
  batchSize: z.number().int().min(1).max(4096).default(64),
  /**
   * 0.03 since 2026-12-06 (was 1e-4): on standardised features a softmax head with next to no penalty
   * separates a small training split within a few epochs and its logits grow until early stopping
   * halts them, so how confident it is depends on the epoch and the seed (hymenoptera's held-out ECE
   * after temperature scaling ranged 0.029–0.074 over 5 seeds) and no single temperature repairs the
   * shape. Weight decay is what keeps the logits honest (Guo et al. 2017, "On Calibration of Modern
   * Neural Networks", §3: less weight decay, worse calibration): over 5 seeds × the 3 reference
   * datasets 0.03 lowered the held-out NLL after temperature scaling the most and raised top-1
   * (bench/RESULTS.md, "Calibration").
   */
  l2: z.number().min(0).default(0.03),
});

const fineTuneSchema = z.object({
  /** Layer whose output is cached; everything above it (to the feature layer) is retrained. Default: the base's. */
  from: z.string().optional(),
  learningRate: z.number().gt(0).max(0.01).default(5e-5),
  epochs: z.number().int().min(1).max(200).default(8),
  patience: z.number().int().min(1).max(200).default(3),
  batchSize: z.number().int().min(1).max(512).default(16),
});

/**
 * Training options, with the defaults a user gets when they only name a dataset. Precedence:
 * command-line flags (or the JSON config) > the dataset's manifest.json > these defaults.
 */
export const trainOptionsSchema = z.object({
  dataset: nameSchema,
  /** Model name to write; defaults to the manifest's `model` or the dataset name. */
  model: nameSchema.optional(),
  /**
   * `auto` (the default; model/bases.ts AUTO_DESCRIPTION, resolveBase). EDGETUNE_DEFAULT_BASE (the stack's
   * `defaultBase`) overrides it.
   */
  base: z.string().default(() => process.env.EDGETUNE_DEFAULT_BASE || AUTO_BASE),
  strategy: strategySchema.default("head"),
  /** 160 px: ≈ 2× faster than 224 at the edge for about a point of accuracy. */
  imageSize: imageSizeSchema.default(160),
  seed: z.number().int().min(0).default(42),
  valFraction: z.number().gt(0).lt(1).default(0.2),
  /** Augmented views per training image (1 = none). */
  views: z.number().int().min(1).max(16).default(3),
  head: headSchema.prefault({}),
  fineTune: fineTuneSchema.prefault({}),
  weights: z.enum(["float16", "uint8", "float32"]).default("float16"),
  /** Promote only if accuracy ≥ current − tolerance on the same held-out images. */
  promotionTolerance: z.number().min(0).max(1).default(0.01),
  /**
   * Promote only if every label has at least this many held-out images that could be evaluated:
   * below that, an accuracy says nothing (20 % of 8 images per label gives 2).
   */
  minHeldOutPerLabel: z.number().int().min(0).max(10_000).default(2),
  /**
   * `if-better`: promote when the rules above hold; `always`: promote without checking them (an
   * operator's explicit choice, e.g. a first model from a handful of images); `never`: keep for review.
   */
  promote: z.enum(["if-better", "always", "never"]).default("if-better"),
  /**
   * How each label's score threshold is set on the calibrated held-out scores (release/thresholds.ts):
   * `f1` (best F1 per label) or `precision:<target>` (the lowest threshold reaching that precision).
   */
  thresholdPolicy: z
    .string()
    .default("f1")
    .refine((s) => s === "f1" || /^precision:(0(\.\d+)?|1(\.0+)?)$/.test(s), "must be f1 or precision:<target in (0, 1]>, e.g. precision:0.95"),
  /**
   * Share of the labels' held-out images the novelty rule may answer "none of these" (shared/novelty.ts):
   * its floor is the similarity below which that share of them falls. 0 turns the rule off.
   */
  noveltyReject: z.number().min(0).max(0.5).default(0.05),
  /** The dataset's rejection class (the manifest's `noneLabel`): answered as "none of these". */
  noneLabel: z.string().min(1).optional(),
  /** Train even if this exact version exists. */
  force: z.boolean().default(false),
  /**
   * An operator's explicit act (flags only; a manifest cannot set them, release/ownership.ts): train this
   * dataset into a model another dataset created, which then belongs to this one (`takeOver`, which
   * may change its labels too); or change the label set of this dataset's own model (`relabel`).
   */
  takeOver: z.boolean().default(false),
  relabel: z.boolean().default(false),
});
export type TrainOptions = z.output<typeof trainOptionsSchema>;
export type TrainInput = z.input<typeof trainOptionsSchema>;

/** Validates options; rejects unknown enum values with the list of valid ones. */
export function resolveOptions(input: TrainInput, manifest?: DatasetManifest): TrainOptions {
  const fromManifest: Partial<TrainInput> = {};
  if (manifest?.base) fromManifest.base = manifest.base;
  if (manifest?.strategy) fromManifest.strategy = manifest.strategy;
  if (manifest?.imageSize) fromManifest.imageSize = manifest.imageSize;
  if (manifest?.epochs) fromManifest.head = { epochs: manifest.epochs };
  if (manifest?.model) fromManifest.model = manifest.model;
  if (manifest?.noneLabel) fromManifest.noneLabel = manifest.noneLabel;
  const merged = { ...fromManifest, ...stripUndefined(input), head: { ...fromManifest.head, ...stripUndefined(input.head ?? {}) } };
  if (merged.strategy !== undefined && !(STRATEGIES as readonly string[]).includes(merged.strategy))
    throw new InvalidOptionError("strategy", merged.strategy, STRATEGIES);
  if (merged.imageSize !== undefined && !(IMAGE_SIZES as readonly number[]).includes(merged.imageSize))
    throw new InvalidOptionError("image size", merged.imageSize, IMAGE_SIZES);
  return parseContract(trainOptionsSchema, merged, "training options");
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/**
 * Part of every version id: raised when the same data and options would give a different model or
 * evaluation. 2: held-out near-duplicates of training images leave the evaluation (which early stopping
 * and promotion read). 3: the head learns on standardised features, for darknet-tiny pooled from four
 * layers (fit/standardize.ts, model/bases.ts). 4: scores calibrated (a temperature folded into the head) and
 * per-label thresholds in the metadata (fit/calibrate.ts, release/thresholds.ts).
 */
export const TRAINER_VERSION = 4;

/**
 * The version id: a function of the data, the options that shape the model and the base weights.
 * The same dataset fingerprint and config give the same id, so a duplicate trigger finds the version
 * already written and does nothing.
 */
export async function versionId(options: TrainOptions, datasetFingerprint: string, baseSha256: string): Promise<string> {
  // Promotion policy does not shape the model: a changed policy finds the version already trained.
  const {
    force: _force,
    promotionTolerance: _tol,
    minHeldOutPerLabel: _min,
    promote: _promote,
    dataset: _dataset,
    takeOver: _takeOver,
    relabel: _relabel,
    ...shaping
  } = options;
  return `v${(await sha256Hex(JSON.stringify({ TRAINER_VERSION, shaping, datasetFingerprint, baseSha256 }))).slice(0, 12)}`;
}

/** The defaults a run gets when only a dataset is named (the CLI's help shows these). */
export const DEFAULT_OPTIONS = trainOptionsSchema.parse({ dataset: "defaults" });

/**
 * Training options from a JSON file (`edgetune train --config`), checked before anything runs: a missing
 * file, invalid JSON and unknown keys are errors that say what to fix (a flat `{"epochs": 5}` would
 * otherwise be dropped silently, and the run report "exists").
 */
export async function readConfigFile(path: string): Promise<Partial<TrainInput>> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch {
    throw new EdgetuneError("config_not_found", `Config file ${path} cannot be read (does it exist?).`);
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new EdgetuneError("config_invalid", `Config file ${path} is not valid JSON (${e instanceof Error ? e.message : e}).`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value))
    throw new EdgetuneError("config_invalid", `Config file ${path} must hold a JSON object of options.`);
  const unknown = unknownKeys(value as Record<string, unknown>);
  if (unknown.length > 0) {
    throw new EdgetuneError(
      "config_invalid",
      `Config file ${path}: unknown option${unknown.length > 1 ? "s" : ""} ${unknown.join(", ")}. Options: ${Object.keys(trainOptionsSchema.shape).join(", ")}; head.{${Object.keys(headSchema.shape).join(", ")}}; fineTune.{${Object.keys(fineTuneSchema.shape).join(", ")}}.`,
    );
  }
  return value as Partial<TrainInput>;
}

function unknownKeys(value: Record<string, unknown>): string[] {
  const nested = { head: Object.keys(headSchema.shape), fineTune: Object.keys(fineTuneSchema.shape) };
  const out: string[] = [];
  for (const key of Object.keys(value)) {
    if (Object.hasOwn(trainOptionsSchema.shape, key)) continue;
    const home = Object.entries(nested).find(([, keys]) => keys.includes(key))?.[0];
    out.push(home ? `${key} (did you mean ${home}.${key}?)` : key);
  }
  for (const [group, keys] of Object.entries(nested)) {
    const inner = value[group];
    if (inner && typeof inner === "object") for (const key of Object.keys(inner)) if (!keys.includes(key)) out.push(`${group}.${key}`);
  }
  return out;
}

/**
 * A config file under the flags: a flag given wins, a flag not given leaves the file's value. Commander
 * reports an absent flag as `undefined`, and spreading that over the file would erase the file's value.
 */
export function mergeConfig(fromFile: Partial<TrainInput>, flags: TrainInput): TrainInput {
  const { head, fineTune, ...top } = flags;
  return {
    ...fromFile,
    ...definedOnly(top),
    dataset: flags.dataset,
    head: { ...fromFile.head, ...definedOnly(head ?? {}) },
    fineTune: { ...fromFile.fineTune, ...definedOnly(fineTune ?? {}) },
  };
}

function definedOnly<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}
