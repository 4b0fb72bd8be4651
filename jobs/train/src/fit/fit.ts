import * as tf from "@tensorflow/tfjs";
import { EdgetuneError } from "#shared/errors.ts";
import type { DatasetImage } from "../dataset/read.ts";
import { type ExtractorSpec, extractSplits, type Features } from "../features/extract.ts";
import type { PooledFeatures } from "../features/pooled.ts";
import type { RunPlan } from "../plan.ts";
import { type CurrentModel, currentHeadWeights, isComparable } from "../release/promote.ts";
import type { RunContext } from "../run.ts";
import { s3Checkpointer } from "./checkpoint.ts";
import { buildTop } from "./finetune.ts";
import { applyLayers, type EpochLog, headLayers, LAYER_NAMES, predictRows, trainModel } from "./head.ts";
import { fitNovelty, type NoveltyFit } from "./novelty.ts";
import { memoryRows, packRows, type RowSource } from "./rows.ts";
import { foldStandardization, identityStandardizer, standardizedLayerName, standardizedRows, standardizerOf, unfoldStandardization } from "./standardize.ts";

/**
 * Stage 3: the classifier's trainable parts. Strategy `head`: a new dense head on the pooled features,
 * warm-started from the served version when it is a retrain of the same dataset. Strategy `finetune`:
 * then the base's top blocks together with that head, at a very small learning rate, on the cached
 * output of the frozen bottom (see finetune.ts). The base model's layers are trained in place.
 */
export interface Fitted {
  /** The head's layers (trained), applied after global pooling in the exported model. */
  head: tf.layers.Layer[];
  history: { head: EpochLog[]; fineTune: EpochLog[] };
  /** Class probabilities of every held-out image (`pooled.val`, in order) and their true classes. */
  valProbs: Float32Array[];
  yVal: Int32Array;
  /** The labels' mean directions in the served features and the held-out images' similarity to them (`pooled.val` order). */
  novelty: NoveltyFit;
}

export async function fitClassifier(ctx: RunContext, plan: RunPlan, baseModel: tf.LayersModel, pooled: PooledFeatures, current: CurrentModel): Promise<Fitted> {
  const { options, dataset, base } = plan;
  const classes = dataset.labels.length;
  const labelIndex = new Map(dataset.labels.map((l, i) => [l, i]));
  // Training rows: every augmented view of a training image; held-out rows: view 0, as served.
  const rowsOf = (f: Features, images: readonly DatasetImage[], views: number): RowSource => {
    const picked = images.flatMap((img) => (f.byId.get(img.id) ?? []).slice(0, views).map((v) => ({ img, v })));
    return memoryRows(
      picked.map((p) => p.v),
      f.shape,
      Int32Array.from(picked, (p) => labelIndex.get(p.img.label) as number),
    );
  };
  const hasVal = pooled.val.length > 0;
  // Every label but the rejection class gets a mean direction (shared/novelty.ts).
  const real = dataset.labels.map((_, i) => i).filter((i) => dataset.labels[i] !== options.noneLabel);
  // A head alone learns on standardised features; the scaling is folded into it afterwards
  // (standardize.ts). Fine-tuning keeps raw features (one layer): the head it goes on training there,
  // with its dropout and L2 penalty, keeps meaning what it meant when it was fitted.
  const rawTrain = rowsOf(pooled.features, pooled.train, options.views);
  const scaler = options.strategy === "head" ? await standardizerOf(rawTrain) : identityStandardizer(rawTrain.shape.reduce((a, b) => a * b, 1));
  const trainData = standardizedRows(rawTrain, scaler);
  const valData = standardizedRows(rowsOf(pooled.features, pooled.val, 1), scaler);

  const head = headLayers(classes, { ...options.head, seed: options.seed });
  const headInput = tf.input({ shape: [pooled.features.shape.reduce((a, b) => a * b, 1)] });
  const headModel = tf.model({ inputs: headInput, outputs: applyLayers(head, headInput) });
  const warm = currentHeadWeights(current, dataset.name, dataset.labels, isComparable(plan));
  if (warm) {
    for (const layer of head) {
      const w = warm.weights.get(layer.name);
      if (!w || w.length !== layer.getWeights().length || !w.every((t, i) => t.shape.join() === layer.getWeights()[i]?.shape.join())) continue;
      // The served head takes raw features; this one learns on standardised ones.
      if (layer.name !== standardizedLayerName(head)) layer.setWeights(w);
      else {
        const unfolded = unfoldStandardization(w, scaler);
        layer.setWeights(unfolded);
        for (const t of unfolded) t.dispose();
      }
    }
    for (const ts of warm.weights.values()) for (const t of ts) t.dispose();
    ctx.log.info(`head starts from version ${warm.version}`);
  }
  const history: Fitted["history"] = { head: [], fineTune: [] };
  history.head = await ctx.stage("train head", () =>
    trainModel(headModel, trainData, hasVal ? valData : undefined, classes, { ...options.head, seed: options.seed }, (e) =>
      ctx.log.progress("train head", e.epoch, options.head.epochs),
    ),
  );
  const headValProbs = options.strategy !== "finetune" ? await predictRows(headModel, valData) : [];
  foldStandardization(head, scaler); // from here on the head takes raw pooled features
  if (options.strategy !== "finetune") {
    const novelty = await ctx.stage("class means", () => fitNovelty(rowsOf(pooled.features, pooled.train, 1), rowsOf(pooled.features, pooled.val, 1), real));
    return { head, history, valProbs: headValProbs, yVal: valData.y, novelty };
  }

  const from = options.fineTune.from ?? base.fineTuneFrom;
  if (!from) throw new EdgetuneError("invalid_option", `Base ${base.id} names no fine-tuning cut; pass --fine-tune-from <layer>.`);
  const bottom = tf.model({ inputs: baseModel.inputs, outputs: baseModel.getLayer(from).output as tf.SymbolicTensor });
  const { pooledLayers: _pooledLayers, ...single } = plan.pooledSpec;
  const bottomSpec: ExtractorSpec = { ...single, layer: from, pooled: false };
  // The maps are computed into their packs (or found there) and not kept: every epoch streams them
  // back (rows.ts), so memory does not grow with the dataset.
  const maps = await ctx.stage(
    "bottom features",
    () =>
      extractSplits(ctx.store, bottom, bottomSpec, { train: pooled.train, heldOut: pooled.val }, (split, d, t) => ctx.log.progress(`bottom (${split})`, d, t), {
        retain: false,
      }),
    (f) => ({ ...f.stats, shape: f.shape.join("×") }),
  );
  const classOf = (images: readonly DatasetImage[]) => new Map(images.map((i) => [i.id, labelIndex.get(i.label) as number]));
  const [mapsTrain, mapsVal, mapsServed] = packRows(ctx.store, maps.packs, maps.shape, [
    { classOf: classOf(pooled.train), views: options.views },
    { classOf: classOf(pooled.val), views: 1 },
    { classOf: classOf(pooled.train), views: 1 },
  ]) as [RowSource, RowSource, RowSource];
  const top = buildTop(baseModel, from, base.featureLayer, head);
  history.fineTune = await ctx.stage("fine-tune", () =>
    trainModel(
      top,
      mapsTrain,
      hasVal ? mapsVal : undefined,
      classes,
      { ...options.fineTune, seed: options.seed, optimizer: "adam" },
      (e) => (e.resumed ? ctx.log.info(`fine-tuning resumes after epoch ${e.epoch}`) : ctx.log.progress("fine-tune", e.epoch, options.fineTune.epochs)),
      s3Checkpointer(ctx.store, plan.name, plan.version, "finetune"),
    ),
  );
  // Held-out rows come in pack order; the evaluation wants them in the order of pooled.val.
  const probs = await predictRows(top, mapsVal);
  // The tuned top changed the features: the mean directions come from it, up to its pooling.
  const toFeatures = tf.model({ inputs: top.inputs, outputs: top.getLayer(`${LAYER_NAMES.pool}_top`).output as tf.SymbolicTensor });
  const tuned = await ctx.stage("class means", () => fitNovelty(mapsServed, mapsVal, real, toFeatures));
  const rowOf = new Map((mapsVal.ids ?? []).map((id, row) => [id, row]));
  const inValOrder = pooled.val.map((img) => {
    const row = rowOf.get(img.id);
    if (row === undefined) throw new EdgetuneError("cache_incomplete", `The cached bottom map of ${img.key} is missing; run the training again.`);
    return row;
  });
  const valProbs = inValOrder.map((row) => probs[row] as Float32Array);
  const novelty = { ...tuned, valSimilarity: Float32Array.from(inValOrder, (row) => tuned.valSimilarity[row] as number) };
  return { head, history, valProbs, yVal: valData.y, novelty };
}
