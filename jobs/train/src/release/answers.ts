import { DatasetError } from "#shared/errors.ts";
import { CALIBRATION_FOLDS, type Calibration, calibrate, foldTemperature, withTemperature } from "../fit/calibrate.ts";
import type { Fitted } from "../fit/fit.ts";
import type { RunPlan } from "../plan.ts";
import type { RunContext } from "../run.ts";
import { type AnsweredMetrics, answeredMetrics, type LabelThreshold, labelThresholds, noveltyFloor, parseThresholdPolicy, policyText } from "./thresholds.ts";

/**
 * The stage between fitting and evaluating: what an answer of this version means. The scores are
 * calibrated (a temperature, folded into the head, so the exported model gives calibrated scores),
 * each label gets a threshold below which the answer is "unsure", and the dataset's rejection class,
 * if it has one, is named; below a floor of similarity to the labels' training images (shared/novelty.ts)
 * an image is none of these too. All of it fitted on the held-out split and measured there cross-fitted.
 */
export interface Answers {
  calibration: Calibration;
  policy: string;
  thresholds: Record<string, LabelThreshold>;
  answered: AnsweredMetrics;
  /** The label answered as "none of these", and its output index. */
  none?: { label: string; index: number };
  /** The novelty rule (shared/novelty.ts): its floor and the share of the labels' held-out images below it. Absent: turned off. */
  novelty?: { floor: number; heldOutRejected: number; means: Float32Array; features: number };
}

/** The rejection class's output index; checked right after planning, before any features are computed. */
export function noneIndexOf(plan: RunPlan): number | undefined {
  const { labels } = plan.dataset;
  const { noneLabel } = plan.options;
  if (noneLabel === undefined) return undefined;
  const index = labels.indexOf(noneLabel);
  if (index === -1)
    throw new DatasetError(
      `The manifest names "${noneLabel}" as the none-of-these folder, but dataset ${plan.dataset.name} has no label folder of that name (labels: ${labels.join(", ")}).`,
    );
  return index;
}

export async function answerRules(ctx: RunContext, plan: RunPlan, fitted: Fitted): Promise<Answers> {
  const { labels } = plan.dataset;
  const { noneLabel, seed } = plan.options;
  const noneIndex = noneIndexOf(plan);
  const policy = parseThresholdPolicy(plan.options.thresholdPolicy);
  return ctx.stage(
    "calibrate",
    async () => {
      const truth = Array.from(fitted.yVal);
      const calibration = calibrate(fitted.valProbs, truth, seed);
      // From here on the head gives calibrated scores: the export and every consumer of it.
      foldTemperature(fitted.head, calibration.temperature);
      // The shipped thresholds apply to the shipped scores (every held-out row, the final T); their
      // effect is measured cross-fitted on the out-of-fold scores.
      const shipped = fitted.valProbs.map((p) => withTemperature(p, calibration.temperature));
      const thresholds = labelThresholds(labels, shipped, truth, policy, noneIndex);
      // The novelty floor: the similarity below which `noveltyReject` of the labels' held-out images fall.
      const reject = plan.options.noveltyReject;
      const similarities = fitted.novelty.valSimilarity;
      const floor = reject > 0 ? noveltyFloor(similarities, truth, noneIndex, reject) : undefined;
      const ofLabels = Array.from(similarities).filter((_, i) => truth[i] !== noneIndex);
      const novelty =
        floor === undefined
          ? undefined
          : {
              floor,
              heldOutRejected: ofLabels.filter((v) => v < floor).length / Math.max(1, ofLabels.length),
              means: fitted.novelty.means,
              features: fitted.novelty.features,
            };
      const answered = answeredMetrics(
        labels,
        calibration.probs,
        truth,
        policy,
        noneIndex,
        seed,
        CALIBRATION_FOLDS,
        novelty ? { similarity: similarities, reject } : undefined,
      );
      for (const [label, t] of Object.entries(thresholds))
        if (!t.reached) ctx.log.warn(`label ${label} does not reach the precision target on the held-out images; its threshold is that of its best precision`);
      return {
        calibration,
        policy: policyText(policy),
        thresholds,
        answered,
        ...(noneLabel !== undefined && noneIndex !== undefined ? { none: { label: noneLabel, index: noneIndex } } : {}),
        ...(novelty ? { novelty } : {}),
      };
    },
    (a) => ({
      temperature: Number(a.calibration.temperature.toFixed(3)),
      eceBefore: Number(a.calibration.eceBefore.toFixed(4)),
      eceAfter: Number(a.calibration.eceAfter.toFixed(4)),
      answered: Number(a.answered.answered.toFixed(3)),
    }),
  );
}
