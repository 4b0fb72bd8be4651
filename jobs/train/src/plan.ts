import type { BaseMetadata } from "#shared/contracts/base.ts";
import { sha256Hex } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import type { PreprocessingSpec } from "#shared/preprocess.ts";
import { resolveOptions, type TrainInput, type TrainOptions, versionId } from "./config.ts";
import { type Dataset, readDataset } from "./dataset/read.ts";
import { type ExtractorSpec, featureSpec } from "./features/extract.ts";
import { type BaseChoice, BEST_BASE, baseCandidates, resolveBase } from "./model/bases.ts";
import type { RunContext } from "./run.ts";

/**
 * Stage 1: what this run will do, decided before anything heavy. The dataset is listed and split
 * (its manifest may set options), the options resolved, the base imported if needed, and the version
 * id derived from all of them, so a repeated trigger can see at once that its version exists.
 */
export interface RunPlan {
  options: TrainOptions;
  dataset: Dataset;
  base: BaseMetadata;
  /** How `auto` was resolved, or `best` chosen (absent when a base was named). */
  baseChoice?: BaseChoice;
  /** With `best`: the bases the training run scores (model/choose-base.ts); `base` is a stand-in until then. */
  candidates?: BaseMetadata[];
  /** The model written to: the manifest's or options' `model`, else the dataset's name. */
  name: string;
  version: string;
  /** The preprocessing the base expects, and the identity of its pooled features (their cache key). */
  preprocessing: PreprocessingSpec;
  pooledSpec: ExtractorSpec;
}

export async function planRun(ctx: RunContext, input: TrainInput): Promise<RunPlan> {
  const preliminary = resolveOptions(input);
  const dataset = await ctx.stage(
    "read dataset",
    () => readDataset(ctx.store, preliminary.dataset, { seed: preliminary.seed, valFraction: preliminary.valFraction }),
    (d) => ({ images: d.images.length, labels: d.labels.length, ignored: d.ignored.length }),
  );
  const options = resolveOptions(input, dataset.manifest);
  for (const w of dataset.warnings) ctx.log.warn(w);
  if (options.base === BEST_BASE) {
    // Chosen by the training run, after planning (it needs features): the version names every candidate.
    const candidates = await ctx.stage("bases", () => baseCandidates(ctx.store));
    const sha = await sha256Hex(candidates.map((c) => c.sha256).join(","));
    const version = await versionId(options, dataset.fingerprint, sha);
    const first = candidates[0] as BaseMetadata;
    return { options, dataset, base: first, candidates, name: options.model ?? options.dataset, version, ...featureSpec(first, options) };
  }
  const { base, choice } = await ctx.stage(
    "base",
    () => resolveBase(ctx.store, options.base),
    // One line says which base, from where, and (auto) why: nothing else about the base is logged.
    (b) => ({ id: b.base.id, ...(b.choice ? { chosen: b.choice.reason } : { from: b.from }) }),
  );
  // The version id names the base actually used: `auto` that resolves to darknet-tiny is the same model
  // as darknet-tiny asked by name (no retraining when the default changed to auto).
  const resolved = { ...options, base: base.id };
  const version = await versionId(resolved, dataset.fingerprint, base.sha256);
  return { options: resolved, dataset, base, baseChoice: choice, name: options.model ?? options.dataset, version, ...featureSpec(base, options) };
}

/** True when the planned version was written already (by an earlier or a concurrent run). */
export async function versionExists(ctx: RunContext, plan: RunPlan): Promise<boolean> {
  return !plan.options.force && (await ctx.store.head(keys.metadata(plan.name, plan.version))) !== null;
}
