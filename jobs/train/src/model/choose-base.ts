/**
 * `--base best`: the base chosen per dataset by measurement. Every candidate (the bases that install with
 * the project, and the ImageNet MobileNetV2 where it is already in the bucket) embeds the training split
 * (view 0, through the same feature cache training uses, so the chosen base's features are reused and the
 * next run of any candidate costs only its new images); a softmax regression on each candidate's pooled
 * features is scored by stratified k-fold cross-validation (k = 3, seeded); the best mean accuracy wins,
 * ties to the earlier candidate. Every score is in the version's `base.choice` (report and metadata).
 * The held-out split is not looked at: it stays the evaluation of the trained model.
 */
import * as tf from "@tensorflow/tfjs";
import type { BaseMetadata } from "#shared/contracts/base.ts";
import { mulberry32 } from "../dataset/augment.ts";
import { extractFeatures, extractorFor, featureSpec } from "../features/extract.ts";
import type { RunPlan } from "../plan.ts";
import type { RunContext } from "../run.ts";
import { BEST_BASE, loadBase } from "./bases.ts";

const FOLDS = 3;

export interface BaseScore {
  id: string;
  accuracy: number;
}

export async function chooseBase(ctx: RunContext, plan: RunPlan, candidates: readonly BaseMetadata[]): Promise<RunPlan> {
  const train = plan.dataset.images.filter((i) => i.split === "train");
  const scores: BaseScore[] = [];
  for (const base of candidates) {
    const accuracy = await ctx.stage(
      `score base ${base.id}`,
      async () => {
        const model = await loadBase(ctx.store, base, plan.options.imageSize);
        try {
          const spec = { ...featureSpec(base, plan.options).pooledSpec, views: 1 };
          const extractor = extractorFor(model, spec);
          const features = await extractFeatures(ctx.store, extractor, spec, train, (d, t) => ctx.log.progress(`features for ${base.id}`, d, t));
          const rows = train.flatMap((i) => {
            const v = features.byId.get(i.id)?.[0];
            return v ? [{ x: v, y: plan.dataset.labels.indexOf(i.label) }] : [];
          });
          return await crossValidate(rows, plan.dataset.labels.length, plan.options.seed);
        } finally {
          model.dispose();
        }
      },
      (a) => ({ accuracy: a }),
    );
    scores.push({ id: base.id, accuracy });
  }
  let best = 0;
  scores.forEach((s, i) => {
    if (s.accuracy > (scores[best] as BaseScore).accuracy) best = i;
  });
  const chosen = candidates[best] as BaseMetadata;
  const listed = scores.map((s) => `${s.id} ${(s.accuracy * 100).toFixed(1)} %`).join(", ");
  ctx.log.info(`base ${chosen.id} chosen by cross-validation`, { scores: listed });
  return {
    ...plan,
    base: chosen,
    baseChoice: { requested: BEST_BASE, reason: `best ${FOLDS}-fold cross-validated accuracy on the training split: ${listed}` },
    ...featureSpec(chosen, plan.options),
  };
}

/** Mean accuracy of a softmax regression over `FOLDS` stratified, seeded folds (features standardised per fold). */
export async function crossValidate(rows: readonly { x: Float32Array; y: number }[], classes: number, seed: number): Promise<number> {
  const rand = mulberry32(seed);
  // Stratified folds: each label's rows shuffled (seeded), then dealt out in turn.
  const fold = new Array<number>(rows.length);
  for (let c = 0; c < classes; c++) {
    const idx = rows.flatMap((r, i) => (r.y === c ? [i] : []));
    for (let i = idx.length - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1));
      [idx[i], idx[j]] = [idx[j] as number, idx[i] as number];
    }
    idx.forEach((r, k) => {
      fold[r] = k % FOLDS;
    });
  }
  const dim = rows[0]?.x.length ?? 0;
  let correct = 0;
  let total = 0;
  for (let f = 0; f < FOLDS; f++) {
    // Seeded order: fit() is told not to shuffle (its shuffle is not seeded), and rows come label by label.
    const trainRows = rows.filter((_, i) => fold[i] !== f);
    for (let i = trainRows.length - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1));
      [trainRows[i], trainRows[j]] = [trainRows[j] as (typeof rows)[number], trainRows[i] as (typeof rows)[number]];
    }
    const testRows = rows.filter((_, i) => fold[i] === f);
    if (trainRows.length === 0 || testRows.length === 0) continue;
    const mean = new Float32Array(dim);
    const std = new Float32Array(dim);
    for (const r of trainRows) for (let d = 0; d < dim; d++) mean[d] = (mean[d] as number) + (r.x[d] as number) / trainRows.length;
    for (const r of trainRows) for (let d = 0; d < dim; d++) std[d] = (std[d] as number) + ((r.x[d] as number) - (mean[d] as number)) ** 2 / trainRows.length;
    for (let d = 0; d < dim; d++) std[d] = Math.sqrt(std[d] as number) + 1e-6;
    const matrix = (rs: typeof rows) => {
      const m = new Float32Array(rs.length * dim);
      rs.forEach((r, i) => {
        for (let d = 0; d < dim; d++) m[i * dim + d] = ((r.x[d] as number) - (mean[d] as number)) / (std[d] as number);
      });
      return tf.tensor2d(m, [rs.length, dim]);
    };
    const xTrain = matrix(trainRows);
    const yTrain = tf.oneHot(
      trainRows.map((r) => r.y),
      classes,
    );
    const xTest = matrix(testRows);
    const model = tf.sequential({
      layers: [
        tf.layers.dense({
          inputShape: [dim],
          units: classes,
          activation: "softmax",
          kernelInitializer: tf.initializers.glorotUniform({ seed: seed + f }),
          kernelRegularizer: tf.regularizers.l2({ l2: 1e-3 }),
        }),
      ],
    });
    model.compile({ optimizer: tf.train.adam(0.03), loss: "categoricalCrossentropy" });
    try {
      await model.fit(xTrain, yTrain, { epochs: 60, batchSize: 32, shuffle: false, verbose: 0 });
      const predicted = tf.tidy(() => (model.predict(xTest) as tf.Tensor).argMax(-1));
      const p = (await predicted.data()) as Int32Array;
      predicted.dispose();
      testRows.forEach((r, i) => {
        if (p[i] === r.y) correct++;
      });
      total += testRows.length;
    } finally {
      model.dispose();
      xTrain.dispose();
      yTrain.dispose();
      xTest.dispose();
    }
  }
  return total > 0 ? correct / total : 0;
}
