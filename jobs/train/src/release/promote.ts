import * as tf from "@tensorflow/tfjs";
import { readPointer, readPromotedModel } from "#shared/artifacts.ts";
import type { ArtifactMetadata, ModelPointer } from "#shared/contracts/artifact.ts";
import { preprocess } from "#shared/preprocess.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import { decodeImage } from "../dataset/decode.ts";
import type { DatasetImage } from "../dataset/read.ts";
import type { PooledFeatures } from "../features/pooled.ts";
import { concatRows, LAYER_NAMES, predictRows } from "../fit/head.ts";
import { memoryRows } from "../fit/rows.ts";
import { applyBetween } from "../model/graph.ts";
import { loadModel, WEIGHTS_FILE } from "../model/io.ts";
import { percent as pct } from "../output.ts";
import type { RunPlan } from "../plan.ts";
import type { RunContext } from "../run.ts";
import type { Evaluation } from "./evaluate.ts";
import { argmax } from "./evaluate.ts";

/**
 * The currently promoted version, read (every byte verified) and loaded once per training run: it
 * seeds the warm start and is scored against the new version. `error` when the pointer exists but the
 * version cannot be read, null when nothing was ever promoted. The caller disposes `model`.
 */
export type CurrentModel = { pointer: ModelPointer; metadata: ArtifactMetadata; model: tf.LayersModel } | { error: string } | null;

export async function loadCurrent(store: ObjectStore, name: string, read?: ModelPointer | null): Promise<CurrentModel> {
  // `read`: the pointer the run compared itself with (its ETag is what the pointer write is conditional on).
  const pointer = read === undefined ? await readPointer(store, name) : read;
  if (!pointer) return null;
  try {
    const { metadata, files } = await readPromotedModel(store, name, pointer);
    const model = await loadModel(files.get("model.json") as Uint8Array, new Map([[WEIGHTS_FILE, files.get(WEIGHTS_FILE) as Uint8Array]]));
    return { pointer, metadata, model };
  } catch (e) {
    return { error: `the current version ${pointer.version} cannot be read (${e instanceof Error ? e.message : e})` };
  }
}

/**
 * Scores the current model on the new run's held-out images, so promotion compares like with like.
 * When it shares the new run's base, cut and preprocessing and only its head was trained, it is scored
 * on the cached pooled features (its head only: cheap); otherwise it runs end to end on (at most
 * `maxImages` of) the held-out images.
 */
export interface CurrentScore {
  version: string;
  accuracy: number;
  evaluatedOn: number;
  method: "features" | "images";
}

export async function scoreCurrent(
  store: ObjectStore,
  current: { pointer: ModelPointer; metadata: ArtifactMetadata; model: tf.LayersModel },
  val: readonly DatasetImage[],
  pooledFeatures: (image: DatasetImage) => Float32Array | undefined,
  comparable: (m: ArtifactMetadata) => boolean,
  maxImages = 2000,
): Promise<CurrentScore> {
  const { pointer, metadata, model } = current;
  if (comparable(metadata) && model.layers.some((l) => l.name === LAYER_NAMES.pool)) {
    const dim = (model.getLayer(LAYER_NAMES.pool).outputShape as number[])[1] as number;
    const input = tf.input({ shape: [dim] });
    const head = tf.model({ inputs: input, outputs: applyBetween(model, input, model.outputLayers[0]?.name as string, LAYER_NAMES.pool) });
    const rows = val.map((v) => pooledFeatures(v)).filter((f): f is Float32Array => f !== undefined);
    const truth = val.filter((v) => pooledFeatures(v) !== undefined).map((v) => v.label);
    const predicted = (await predictRows(head, memoryRows(rows, [dim], new Int32Array(rows.length)))).map((p) => metadata.labels[argmax(p)]);
    return { version: pointer.version, accuracy: accuracyOf(predicted, truth), evaluatedOn: truth.length, method: "features" };
  }
  const size = metadata.input.size;
  const sample = val.slice(0, maxImages);
  const predicted: (string | undefined)[] = [];
  const truth: string[] = [];
  for (let i = 0; i < sample.length; i += 16) {
    const batch = sample.slice(i, i + 16);
    const inputs: Float32Array[] = [];
    for (const image of batch) {
      const bytes = await store.get(image.key);
      if (!bytes) continue;
      try {
        inputs.push(preprocess(await decodeImage(bytes), size, metadata.preprocessing));
        truth.push(image.label);
      } catch {
        // undecodable images are skipped for both models alike
      }
    }
    if (inputs.length === 0) continue;
    const probs = tf.tidy(() => model.predict(tf.tensor4d(concatRows(inputs), [inputs.length, size, size, 3])) as tf.Tensor2D);
    for (const p of await probs.array()) predicted.push(metadata.labels[argmax(p)]);
    probs.dispose();
  }
  return { version: pointer.version, accuracy: accuracyOf(predicted, truth), evaluatedOn: truth.length, method: "images" };
}

function accuracyOf(predicted: (string | undefined)[], truth: string[]): number {
  if (truth.length === 0) return 0;
  let ok = 0;
  truth.forEach((t, i) => {
    if (predicted[i] === t) ok++;
  });
  return ok / truth.length;
}

/**
 * The current version's head weights, when the current version was trained on the same dataset with
 * the same base, cut, size, preprocessing and labels, so that a retrain after new images starts from
 * what is already served and converges in a few epochs (the cheap nightly run). Another dataset
 * trained into the same model starts from scratch. Null when there is nothing compatible.
 */
export function currentHeadWeights(
  current: CurrentModel,
  datasetName: string,
  labels: readonly string[],
  comparable: (m: ArtifactMetadata) => boolean,
): { version: string; weights: Map<string, tf.Tensor[]> } | null {
  if (!current || "error" in current) return null;
  const m = current.metadata;
  if (!comparable(m) || m.dataset.name !== datasetName || m.labels.join("\n") !== labels.join("\n")) return null;
  const weights = new Map<string, tf.Tensor[]>();
  for (const name of Object.values(LAYER_NAMES)) {
    const layer = current.model.layers.find((l) => l.name === name);
    if (layer && layer.getWeights().length > 0)
      weights.set(
        name,
        layer.getWeights().map((w) => w.clone()),
      );
  }
  return { version: current.pointer.version, weights };
}

/**
 * Whether a served version computes its features exactly as this run does (same base weights, cut,
 * size, preprocessing, and only a head on top): then its head can seed the warm start, and it can be
 * scored on this run's cached features instead of end to end.
 */
export function isComparable(plan: RunPlan): (m: ArtifactMetadata) => boolean {
  return (m) =>
    m.base.sha256 === plan.base.sha256 &&
    m.base.featureLayer === plan.base.featureLayer &&
    (m.base.pooledLayers ?? []).join() === (plan.pooledSpec.pooledLayers ?? []).join() &&
    m.input.size === plan.options.imageSize &&
    m.strategy === "head" &&
    JSON.stringify(m.preprocessing) === JSON.stringify(plan.preprocessing);
}

export interface Promotion {
  promoted: boolean;
  reason: string;
  /** The served version, scored on the same held-out images. */
  current?: CurrentScore;
}

/**
 * Stage 6: whether the new version may replace what is served. It needs evidence — at least
 * `minHeldOutPerLabel` evaluated held-out images in every label — and must beat always answering the
 * most common held-out label, and must not be worse (within `promotionTolerance`) than the served
 * version on the same held-out images. The first rule that fails is the reason it is kept back.
 */
export async function decidePromotion(
  ctx: RunContext,
  plan: RunPlan,
  current: CurrentModel,
  pooled: PooledFeatures,
  evaluation: Evaluation,
): Promise<Promotion> {
  const { metrics } = evaluation;
  const evaluated = `${pct(metrics.accuracy)} on ${metrics.evaluatedOn} held-out images`;
  if (plan.options.promote === "never") return { promoted: false, reason: `promote is "never": ${evaluated}, kept for review` };
  if (plan.options.promote === "always") return { promoted: true, reason: `promote is "always" (rules not checked): ${evaluated}` };
  const min = plan.options.minHeldOutPerLabel;
  const thin = plan.dataset.labels.filter((l) => (metrics.perClass[l]?.support ?? 0) < min);
  if (thin.length > 0) {
    const counts = thin.map((l) => `"${l}" ${metrics.perClass[l]?.support ?? 0}`).join(", ");
    return {
      promoted: false,
      reason: `not enough held-out evidence: ${counts} held-out image(s) could be evaluated, at least ${min} per label are needed (add images, or lower minHeldOutPerLabel); keeping it`,
    };
  }
  let score: CurrentScore | undefined;
  if (current !== null && !("error" in current)) {
    const served = current;
    score = await ctx.stage("score current", () =>
      scoreCurrent(ctx.store, served, pooled.val, (img) => pooled.features.byId.get(img.id)?.[0], isComparable(plan)),
    );
    const tolerance = plan.options.promotionTolerance;
    const comparison = `on the same ${score.evaluatedOn} held-out images (tolerance ${pct(tolerance)})`;
    if (metrics.accuracy + tolerance < score.accuracy)
      return {
        promoted: false,
        reason: `worse than current ${score.version}: ${pct(metrics.accuracy)} vs ${pct(score.accuracy)} ${comparison}; keeping it`,
        current: score,
      };
  }
  const baseline = majorityBaseline(metrics.perClass);
  if (metrics.accuracy <= baseline.accuracy)
    return {
      promoted: false,
      reason: `no better than always answering "${baseline.label}": ${pct(metrics.accuracy)} vs ${pct(baseline.accuracy)} on ${metrics.evaluatedOn} held-out images; keeping it`,
      current: score,
    };
  const vs = `${evaluated} (majority-class baseline ${pct(baseline.accuracy)})`;
  if (current === null) return { promoted: true, reason: `first version of this model: ${vs}` };
  if ("error" in current) return { promoted: true, reason: `replacing a broken current version: ${current.error}; ${vs}` };
  const s = score as CurrentScore;
  return {
    promoted: true,
    reason: `accuracy ${pct(metrics.accuracy)} vs current ${s.version} ${pct(s.accuracy)} on the same ${s.evaluatedOn} held-out images (tolerance ${pct(plan.options.promotionTolerance)})`,
    current: s,
  };
}

/** The accuracy of always answering the most common held-out label. */
export function majorityBaseline(perClass: Evaluation["metrics"]["perClass"]): { label: string; accuracy: number } {
  let label = "";
  let most = 0;
  let total = 0;
  for (const [l, m] of Object.entries(perClass)) {
    total += m.support;
    if (m.support > most) [label, most] = [l, m.support];
  }
  return { label, accuracy: total > 0 ? most / total : 1 };
}
