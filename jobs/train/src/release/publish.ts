import * as tf from "@tensorflow/tfjs";
import sharp from "sharp";
import {
  type ArtifactFile,
  HISTORY,
  historyOf,
  type PointerBasis,
  readPointer,
  VersionExistsError,
  writeArtifact,
  writePointerIf,
  writeSharedBase,
} from "#shared/artifacts.ts";
import { type ArtifactMetadata, MAX_CONFUSION_LABELS, SPLIT_FILES, servedFiles } from "#shared/contracts/artifact.ts";
import { CLASS_MEANS_FILE, classMeansBytes } from "#shared/novelty.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import type { Dataset } from "../dataset/read.ts";
import type { PooledFeatures } from "../features/pooled.ts";
import { s3Checkpointer } from "../fit/checkpoint.ts";
import type { Fitted } from "../fit/fit.ts";
import type { BackendInfo } from "../model/backend.ts";
import type { Exported } from "../model/export.ts";
import { WEIGHTS_FILE } from "../model/io.ts";
import type { RunPlan } from "../plan.ts";
import type { RunContext } from "../run.ts";
import type { Answers } from "./answers.ts";
import type { Evaluation } from "./evaluate.ts";
import type { OodEvaluation } from "./ood.ts";
import type { Promotion } from "./promote.ts";
import { cappedLists, renderReportHtml, type TrainingReport } from "./report.ts";
import { thresholdValues } from "./thresholds.ts";

/** What a training run ends with; the CLI prints it, the dispatcher logs it. */
export interface TrainResult {
  status: "trained" | "exists";
  name: string;
  version: string;
  promoted: boolean;
  reason: string;
  accuracy?: number;
  report?: TrainingReport;
}

/** Everything the earlier stages produced that goes into the version. */
export interface RunOutcome {
  backend: BackendInfo;
  pooled: PooledFeatures;
  fitted: Fitted;
  answers: Answers;
  evaluation: Evaluation;
  exported: Exported;
  promotion: Promotion;
  /** The pointer as the run read it before comparing itself with the served version. */
  served: PointerBasis;
  /** The manifest's out-of-distribution folder, scored (absent: the dataset has none). */
  ood?: OodEvaluation;
}

const LIBRARIES = { "@tensorflow/tfjs": tf.version.tfjs, edgetune: "0.1.0" };

/**
 * Stage 7: the new immutable version — model files, report, and `metadata.json` written last with a
 * conditional put — then the pointer `current.json`, only if promoted. A concurrent run of the same
 * trigger that wrote the version first turns this run into `exists`.
 */
export async function publishVersion(ctx: RunContext, plan: RunPlan, outcome: RunOutcome): Promise<TrainResult> {
  const { name, version } = plan;
  const { evaluation, exported, served } = outcome;
  let { promotion } = outcome;
  const report = await buildReport(ctx, plan, outcome);
  const split = await publishSharedBase(ctx, plan, exported);
  let written: Awaited<ReturnType<typeof writeArtifact>>;
  try {
    written = await ctx.stage("write version", () =>
      writeArtifact(ctx.store, { ...metadataOf(plan, outcome), ...(split ? { split: split.metadata } : {}) }, [
        { path: "model.json", bytes: exported.files.modelJson },
        { path: WEIGHTS_FILE, bytes: exported.files.weights },
        ...(split?.files ?? []),
        ...(outcome.answers.novelty ? [{ path: CLASS_MEANS_FILE, bytes: classMeansBytes(outcome.answers.novelty.means) }] : []),
        { path: "report.json", bytes: new TextEncoder().encode(JSON.stringify(report, null, 2)) },
        { path: "report.html", bytes: new TextEncoder().encode(renderReportHtml(report)) },
      ]),
    );
  } catch (e) {
    // The same trigger delivered twice, running at once: the other run wrote this version first.
    if (e instanceof VersionExistsError) return existsResult(ctx, plan, "written by a concurrent run of the same dataset and config");
    throw e;
  }
  await s3Checkpointer(ctx.store, name, version, "finetune").clear();
  if (promotion.promoted) {
    // Compare-and-swap against the pointer this run compared itself with: a rollback (or any other move)
    // made while it trained stands, and this version waits for an operator.
    const was = served.pointer;
    const moved = !(await writePointerIf(
      ctx.store,
      name,
      {
        version,
        metadataSha256: written.metadataSha256,
        promotedAt: new Date().toISOString(),
        previous: was?.version ?? null,
        reason: promotion.reason,
        history: was ? [was.version, ...historyOf(was)].slice(0, HISTORY) : [],
        dataset: plan.dataset.name,
        served: servedFiles(written.metadata),
      },
      served,
    ));
    if (moved) {
      const now = await readPointer(ctx.store, name).catch(() => null);
      const what = now ? `${now.reason.startsWith("rollback") ? "rolled back to" : "now"} ${now.version}` : "it was removed";
      promotion = {
        ...promotion,
        promoted: false,
        reason: `not promoted: the served version changed while it trained (${what}); serve this one with edgetune rollback ${name} --to ${version}`,
      };
      ctx.log.warn(promotion.reason);
      report.promotion = promotion; // the stored report.json/html say what was decided before the pointer moved
    }
  }
  const accuracy = evaluation.metrics.accuracy;
  ctx.log.info(promotion.promoted ? `promoted ${name} ${version}` : `kept the current version of ${name}`, { reason: promotion.reason, accuracy });
  return { status: "trained", name, version, promoted: promotion.promoted, reason: promotion.reason, accuracy, report };
}

/**
 * The shared base of a split export, published once per (base, size) and reused by every later version;
 * returns what the version records and its head files. The whole model stays in the version too: older
 * workers, promotion scoring and exports read it (ARCHITECTURE.md "One base, many models").
 */
async function publishSharedBase(
  ctx: RunContext,
  plan: RunPlan,
  exported: Exported,
): Promise<{ metadata: NonNullable<ArtifactMetadata["split"]>; files: ArtifactFile[] } | undefined> {
  const split = exported.split;
  if (!split) return undefined;
  const { base, options } = plan;
  const featureLayer = plan.pooledSpec.layer;
  const shared = await ctx.stage("write shared base", () =>
    writeSharedBase(
      ctx.store,
      { schemaVersion: 1, base: { id: base.id, sha256: base.sha256, featureLayer }, input: { size: options.imageSize, channels: 3 } },
      [
        { path: "model.json", bytes: split.base.modelJson },
        { path: WEIGHTS_FILE, bytes: split.base.weights },
      ],
    ),
  );
  // Same base and size, cut elsewhere (a base whose feature layer changed): this head cannot use it.
  if (shared.manifest.base.featureLayer !== featureLayer) {
    ctx.log.warn(
      `the shared base of ${base.id} at ${options.imageSize} px is cut at ${shared.manifest.base.featureLayer}, not ${featureLayer}; publishing the whole model only`,
    );
    return undefined;
  }
  return {
    metadata: { baseManifestSha256: shared.manifestSha256, features: split.features },
    files: [
      { path: SPLIT_FILES.head, bytes: split.head.modelJson },
      { path: SPLIT_FILES.headWeights, bytes: split.head.weights },
    ],
  };
}

/** The result of a run that found its version already written: nothing to do. */
export function existsResult(ctx: RunContext, plan: RunPlan, reason: string): TrainResult {
  ctx.log.info(`version ${plan.version} ${reason}; nothing to do`);
  return { status: "exists", name: plan.name, version: plan.version, promoted: false, reason };
}

async function buildReport(ctx: RunContext, plan: RunPlan, outcome: RunOutcome): Promise<TrainingReport> {
  const { dataset, base, options } = plan;
  const { backend, pooled, fitted, answers, evaluation, exported, promotion } = outcome;
  const { calibration: c } = answers;
  return {
    name: plan.name,
    version: plan.version,
    dataset: { name: dataset.name, layout: dataset.layout, fingerprint: dataset.fingerprint, labels: dataset.labels, counts: countSplits(dataset) },
    ...cappedLists({
      skipped: pooled.skipped,
      nearDuplicates: pooled.nearDuplicates.map((d) => ({ heldOut: d.valKey, training: d.trainKey, bits: d.bits })),
      ignored: dataset.ignored,
    }),
    warnings: dataset.warnings,
    backend: { name: backend.name, reason: backend.reason },
    base: { id: base.id, featureLayer: base.featureLayer, ...pooledLayersOf(plan), sha256: base.sha256, choice: plan.baseChoice },
    options: options as unknown as Record<string, unknown>,
    phases: ctx.phases,
    history: fitted.history,
    metrics: evaluation.metrics,
    confusion: evaluation.confusion,
    mistakes: await withThumbnails(ctx.store, evaluation.mistakes),
    heldOutScores: evaluation.topScores,
    export: { dtype: exported.dtype, bytes: exported.files.weights.byteLength, maxDelta: exported.maxDelta },
    promotion,
    calibration: { temperature: c.temperature, folds: c.folds, eceBefore: c.eceBefore, eceAfter: c.eceAfter, reliability: c.reliability },
    thresholds: { policy: answers.policy, byLabel: answers.thresholds, ...answers.answered },
    ...(answers.none ? { noneLabel: answers.none.label } : {}),
    ...(answers.novelty ? { novelty: { floor: answers.novelty.floor, heldOutRejected: answers.novelty.heldOutRejected, reject: options.noveltyReject } } : {}),
    ...(outcome.ood ? { ood: outcome.ood } : {}),
  };
}

/** The extra pooled layers, where the run pooled several (absent otherwise, as in older versions). */
function pooledLayersOf(plan: RunPlan): { pooledLayers?: string[] } {
  const layers = plan.pooledSpec.pooledLayers;
  return layers?.length ? { pooledLayers: [...layers] } : {};
}

function metadataOf(plan: RunPlan, outcome: RunOutcome): Omit<ArtifactMetadata, "files"> {
  const { dataset, base, options } = plan;
  const finetune = options.strategy === "finetune";
  return {
    schemaVersion: 1,
    name: plan.name,
    version: plan.version,
    createdAt: new Date().toISOString(),
    labels: dataset.labels,
    input: { size: options.imageSize, channels: 3 },
    preprocessing: plan.preprocessing,
    base: {
      id: base.id,
      sha256: base.sha256,
      featureLayer: base.featureLayer,
      ...pooledLayersOf(plan),
      ...(plan.baseChoice ? { choice: plan.baseChoice } : {}),
    },
    strategy: options.strategy,
    hyperparameters: {
      views: options.views,
      seed: options.seed,
      headUnits: options.head.units,
      headDropout: options.head.dropout,
      headLearningRate: options.head.learningRate,
      headEpochs: options.head.epochs,
      fineTuneFrom: finetune ? (options.fineTune.from ?? base.fineTuneFrom ?? null) : null,
      fineTuneLearningRate: finetune ? options.fineTune.learningRate : null,
      fineTuneEpochs: finetune ? options.fineTune.epochs : null,
    },
    dataset: {
      name: dataset.name,
      fingerprint: dataset.fingerprint,
      images: outcome.pooled.train.length + outcome.pooled.val.length,
      skipped: outcome.pooled.skipped.length,
    },
    metrics: { ...outcome.evaluation.metrics, ...confusionOf(dataset.labels, outcome.evaluation.confusion) },
    ...answerMetadata(outcome.answers),
    weights: { dtype: outcome.exported.dtype, bytes: outcome.exported.files.weights.byteLength },
    libraries: LIBRARIES,
  };
}

/** The confusion matrix for the metadata, where it stays small: the console compares versions from their metadata alone. */
function confusionOf(labels: readonly string[], confusion: number[][]): { confusion?: number[][] } {
  return labels.length <= MAX_CONFUSION_LABELS ? { confusion } : {};
}

/** The version's answer rules as the edge reads them (shared/contracts/artifact.ts answerRules). */
function answerMetadata(a: Answers): Pick<ArtifactMetadata, "calibration" | "thresholds" | "noneLabel" | "novelty"> {
  const { calibration: c, answered } = a;
  return {
    calibration: { method: "temperature", temperature: c.temperature, folds: c.folds, eceBefore: c.eceBefore, eceAfter: c.eceAfter },
    thresholds: {
      policy: a.policy,
      byLabel: thresholdValues(a.thresholds),
      answered: answered.answered,
      answeredAccuracy: answered.answeredAccuracy,
      ...(answered.negativesRejected === undefined ? {} : { negativesRejected: answered.negativesRejected }),
    },
    ...(a.none ? { noneLabel: a.none.label } : {}),
    ...(a.novelty
      ? {
          novelty: {
            method: "cosine-class-mean",
            rows: a.novelty.means.length / a.novelty.features,
            features: a.novelty.features,
            floor: a.novelty.floor,
            heldOutRejected: a.novelty.heldOutRejected,
          },
        }
      : {}),
  };
}

async function withThumbnails(store: ObjectStore, mistakes: TrainingReport["mistakes"]): Promise<TrainingReport["mistakes"]> {
  return Promise.all(
    mistakes.map(async (m) => {
      const bytes = await store.get(m.key).catch(() => null);
      if (!bytes) return m;
      try {
        const jpeg = await sharp(bytes, { pages: 1 }).rotate().resize(96, 96, { fit: "cover" }).jpeg({ quality: 70 }).toBuffer();
        return { ...m, thumbnail: `data:image/jpeg;base64,${jpeg.toString("base64")}` };
      } catch {
        return m;
      }
    }),
  );
}

function countSplits(d: Dataset): Record<string, { train: number; val: number; test: number }> {
  const counts: Record<string, { train: number; val: number; test: number }> = {};
  for (const i of d.images) {
    counts[i.label] ??= { train: 0, val: 0, test: 0 };
    (counts[i.label] as { train: number; val: number; test: number })[i.split]++;
  }
  return counts;
}
