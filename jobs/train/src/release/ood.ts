import * as tf from "@tensorflow/tfjs";
import { decide } from "#shared/answer.ts";
import { similarity } from "#shared/novelty.ts";
import { preprocess } from "#shared/preprocess.ts";
import { decodeImage } from "../dataset/decode.ts";
import type { Fitted } from "../fit/fit.ts";
import type { Exported } from "../model/export.ts";
import { loadModel, WEIGHTS_FILE, withPooledFeatures } from "../model/io.ts";
import type { RunPlan } from "../plan.ts";
import type { RunContext } from "../run.ts";
import type { Answers } from "./answers.ts";

/**
 * Out-of-distribution evaluation (the manifest's `oodFolder`): images that are none of the labels,
 * never trained on, scored end to end by the exported model (decode, preprocess, the model the edge
 * loads) and answered with the version's rules. The report gives the share given no label (unsure or
 * none of these, by the rejection class or the novelty rule) and the AUROC of the rejection score (1 − the
 * best real label's score; and of the novelty rule's, 1 − the similarity) against the
 * held-out images of the labels (their cross-fitted calibrated scores, as the rest of the report).
 * Only the operator knows what "out of distribution" means for a model, so only their folder can say
 * it: a run without one reports nothing here (bench/calibration.ts measures the reference datasets).
 */
export interface OodEvaluation {
  folder: string;
  /** Images scored (at most MAX_OOD_IMAGES, the first by key); undecodable ones are counted apart. */
  images: number;
  undecodable: number;
  /** Shares of the scored images answered unsure, none of these, and either (given no label). */
  unsure: number;
  none: number;
  rejected: number;
  /** Chance that an out-of-distribution image has a higher rejection score than a held-out image of a label (ties half). */
  auroc: number;
  /** The same for the novelty rule's score (1 − similarity to the nearest label's training images); absent when the rule is off. */
  similarityAuroc?: number;
  /** Held-out images of the labels on the other side of the AUROC. */
  heldOut: number;
}

/** A report needs a few hundred; thousands only cost time (each is decoded and run through the whole model). */
export const MAX_OOD_IMAGES = 1000;
const BATCH = 16;

export async function evaluateOod(ctx: RunContext, plan: RunPlan, exported: Exported, fitted: Fitted, answers: Answers): Promise<OodEvaluation | undefined> {
  const folder = plan.dataset.manifest.oodFolder;
  const images = [...plan.dataset.ood].sort((a, b) => a.key.localeCompare(b.key)).slice(0, MAX_OOD_IMAGES);
  if (folder === undefined || images.length === 0) return undefined;
  return ctx.stage(
    "ood",
    async () => {
      const { labels } = plan.dataset;
      const noneIndex = answers.none?.index;
      const thresholds = Object.fromEntries(Object.entries(answers.thresholds).map(([l, t]) => [l, t.threshold]));
      const size = plan.options.imageSize;
      const model = await loadModel(exported.files.modelJson, new Map([[WEIGHTS_FILE, exported.files.weights]]));
      // The pooled features beside the scores, as the edge reads them for the novelty rule.
      const probe = withPooledFeatures(model);
      const novelty = answers.novelty;
      const scores: Float32Array[] = [];
      const similarities: number[] = [];
      let undecodable = 0;
      try {
        for (let i = 0; i < images.length; i += BATCH) {
          const inputs: Float32Array[] = [];
          for (const image of images.slice(i, i + BATCH)) {
            const bytes = await ctx.store.get(image.key);
            try {
              if (!bytes) throw new Error("gone");
              inputs.push(preprocess(await decodeImage(bytes), size, plan.preprocessing));
            } catch {
              undecodable++; // counted, not named: the folder is not training data
            }
          }
          if (inputs.length === 0) continue;
          const flat = new Float32Array(inputs.length * size * size * 3);
          for (const [k, x] of inputs.entries()) flat.set(x, k * x.length);
          const [features, probs] = tf.tidy(() => probe.predict(tf.tensor4d(flat, [inputs.length, size, size, 3])) as tf.Tensor2D[]) as [
            tf.Tensor2D,
            tf.Tensor2D,
          ];
          const data = (await probs.data()) as Float32Array;
          const f = (await features.data()) as Float32Array;
          const dim = features.shape[1];
          tf.dispose([features, probs]);
          for (let r = 0; r < inputs.length; r++) {
            scores.push(data.slice(r * labels.length, (r + 1) * labels.length));
            if (novelty) similarities.push(similarity(f.subarray(r * dim, (r + 1) * dim), novelty.means));
          }
        }
      } finally {
        model.dispose();
      }
      const kinds = scores.map(
        (p, i) => decide(p, labels, thresholds, noneIndex, novelty ? { similarity: similarities[i] as number, floor: novelty.floor } : undefined).kind,
      );
      const share = (kind: string) => kinds.filter((k) => k === kind).length / Math.max(1, kinds.length);
      const rejection = (p: Float32Array) => 1 - Math.max(...Array.from(p).filter((_, c) => c !== noneIndex));
      const truth = Array.from(fitted.yVal);
      const heldOut = answers.calibration.probs.filter((_, i) => truth[i] !== noneIndex);
      return {
        folder,
        images: scores.length,
        undecodable,
        unsure: share("unsure"),
        none: share("none"),
        rejected: share("unsure") + share("none"),
        auroc: auroc(scores.map(rejection), heldOut.map(rejection)),
        ...(novelty
          ? {
              similarityAuroc: auroc(
                similarities.map((v) => -v),
                Array.from(fitted.novelty.valSimilarity)
                  .filter((_, i) => truth[i] !== noneIndex)
                  .map((v) => -v),
              ),
            }
          : {}),
        heldOut: heldOut.length,
      };
    },
    (o) => ({
      images: o.images,
      rejected: Number(o.rejected.toFixed(3)),
      auroc: Number(o.auroc.toFixed(3)),
      ...(o.similarityAuroc === undefined ? {} : { similarityAuroc: Number(o.similarityAuroc.toFixed(3)) }),
    }),
  );
}

/** Mann–Whitney AUROC: the chance that a random positive scores above a random negative (ties count half); NaN without both. */
export function auroc(positives: readonly number[], negatives: readonly number[]): number {
  const all = [...positives.map((s) => ({ s, p: true })), ...negatives.map((s) => ({ s, p: false }))].sort((a, b) => a.s - b.s);
  let rankSum = 0;
  for (let i = 0; i < all.length; ) {
    let j = i;
    while (j < all.length && (all[j] as { s: number }).s === (all[i] as { s: number }).s) j++;
    const rank = (i + 1 + j) / 2; // mean rank of the tie group (1-based)
    for (let k = i; k < j; k++) if ((all[k] as { p: boolean }).p) rankSum += rank;
    i = j;
  }
  const np = positives.length;
  const nn = negatives.length;
  return np > 0 && nn > 0 ? (rankSum - (np * (np + 1)) / 2) / (np * nn) : Number.NaN;
}
