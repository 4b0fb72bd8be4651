import { decide } from "#shared/answer.ts";
import { InvalidOptionError } from "#shared/errors.ts";
import { similarityFloor } from "#shared/novelty.ts";
import { crossFitted, stratifiedFolds } from "../fit/folds.ts";
import { argmax } from "./evaluate.ts";

/**
 * Per-label thresholds (the way Rekognition Custom Labels sets its defaults): an answer "label c with
 * score s" is given only when s ≥ threshold(c); otherwise the answer is "unsure". Computed at training
 * on the calibrated held-out scores, per label, from the held-out images whose top-1 answer is c:
 * - `f1` (default): the threshold with the best F1 of c (precision over answers kept, recall over c's images);
 * - `precision:P`: the lowest threshold whose precision reaches P (most answers at that precision);
 *   a label that never reaches it gets the threshold of its best precision, and is named as such.
 * The rejection class ("none of these", `skip`) has no threshold: it is never an answer to keep.
 */
export type ThresholdPolicy = { kind: "f1" } | { kind: "precision"; target: number };

export function parseThresholdPolicy(text: string): ThresholdPolicy {
  if (text === "f1") return { kind: "f1" };
  const m = /^precision:(0(?:\.\d+)?|1(?:\.0+)?)$/.exec(text);
  const target = m ? Number(m[1]) : Number.NaN;
  if (!(target > 0 && target <= 1)) throw new InvalidOptionError("threshold policy", text, ["f1", "precision:0.95 (any target in (0, 1])"]);
  return { kind: "precision", target };
}

export const policyText = (p: ThresholdPolicy) => (p.kind === "f1" ? "f1" : `precision:${p.target}`);

export interface LabelThreshold {
  threshold: number;
  /** Held-out precision and recall at that threshold (answers kept for this label). */
  precision: number;
  recall: number;
  /** False when a precision target could not be reached on the held-out images. */
  reached: boolean;
}

/** One label's threshold from (score, correct) pairs of the rows answered with it, and how many rows are truly it. */
function labelThreshold(answers: { score: number; correct: boolean }[], support: number, policy: ThresholdPolicy): LabelThreshold {
  // Candidate thresholds are the answers' scores, highest first: keeping the top j answers.
  const sorted = [...answers].sort((a, b) => b.score - a.score);
  let best: LabelThreshold & { key: number } = { threshold: 0, precision: 0, recall: 0, reached: policy.kind === "f1", key: -1 };
  let tp = 0;
  sorted.forEach((a, j) => {
    if (a.correct) tp++;
    // Ties: a threshold keeps every answer with that score, so only the last of equal scores is a candidate.
    if (j + 1 < sorted.length && (sorted[j + 1] as { score: number }).score === a.score) return;
    const precision = tp / (j + 1);
    const recall = support > 0 ? tp / support : 0;
    const f1 = precision + recall > 0 ? (2 * precision * recall) / (precision + recall) : 0;
    const candidate = { threshold: a.score, precision, recall };
    if (policy.kind === "f1") {
      // ≥: among equal F1, the lower threshold (more answers).
      if (f1 >= best.key && f1 > 0) best = { ...candidate, reached: true, key: f1 };
    } else if (precision >= policy.target) best = { ...candidate, reached: true, key: 2 + recall };
    else if (!best.reached && precision > best.key) best = { ...candidate, reached: false, key: precision };
  });
  const { key: _key, ...out } = best;
  return out;
}

/** Thresholds per label from (calibrated) held-out scores; `rows` limits which rows are used (cross-fitting). */
export function labelThresholds(
  labels: readonly string[],
  probs: readonly Float32Array[],
  truth: readonly number[],
  policy: ThresholdPolicy,
  skip: number | undefined,
  rows: readonly number[] = truth.map((_, i) => i),
): Record<string, LabelThreshold> {
  const answers = labels.map(() => [] as { score: number; correct: boolean }[]);
  const support = labels.map(() => 0);
  for (const i of rows) {
    const p = probs[i] as Float32Array;
    const top = argmax(p);
    answers[top]?.push({ score: p[top] as number, correct: top === truth[i] });
    const t = truth[i] as number;
    support[t] = (support[t] ?? 0) + 1;
  }
  const out: Record<string, LabelThreshold> = {};
  labels.forEach((label, c) => {
    if (c !== skip) out[label] = labelThreshold(answers[c] ?? [], support[c] ?? 0, policy);
  });
  return out;
}

export interface AnsweredMetrics {
  /** Share of the held-out images of real labels given a label (neither unsure nor none of these). */
  answered: number;
  /** Accuracy over those images (to compare with top-1 accuracy over all). */
  answeredAccuracy: number;
  /** Shares of the held-out images of real labels answered unsure, and none of these (wrongly rejected). */
  unsure: number;
  none: number;
  /** With a none-of-these class: share of its held-out images given no label (none of these or unsure). */
  negativesRejected?: number;
}

/**
 * The novelty floor (shared/novelty.ts) fitted on `rows` (default: all): the similarity below which `reject`
 * of those rows' images of the labels fall; the rejection class's images have no say.
 */
export function noveltyFloor(
  similarity: ArrayLike<number>,
  truth: readonly number[],
  noneIndex: number | undefined,
  reject: number,
  rows: readonly number[] = truth.map((_, i) => i),
): number {
  return similarityFloor(
    rows.filter((i) => truth[i] !== noneIndex).map((i) => similarity[i] as number),
    reject,
  );
}

/**
 * The thresholds' effect, measured honestly: each fold's rows are decided with thresholds computed on
 * the other folds (the same folds as the calibration), so no image is judged by a threshold it set.
 */
export function answeredMetrics(
  labels: readonly string[],
  probs: readonly Float32Array[],
  truth: readonly number[],
  policy: ThresholdPolicy,
  noneIndex: number | undefined,
  seed: number,
  k: number,
  novelty?: { similarity: ArrayLike<number>; reject: number },
): AnsweredMetrics {
  const split = stratifiedFolds(truth, k, seed);
  // The novelty floor is fitted like the thresholds: on the other folds' images of the labels.
  const floorOf = (rows: readonly number[]) => (novelty ? noveltyFloor(novelty.similarity, truth, noneIndex, novelty.reject, rows) : undefined);
  const decisions = crossFitted(
    probs.length,
    split,
    (rows) => ({ thresholds: thresholdValues(labelThresholds(labels, probs, truth, policy, noneIndex, rows)), floor: floorOf(rows) }),
    (t, i) =>
      decide(
        probs[i] as Float32Array,
        labels,
        t.thresholds,
        noneIndex,
        novelty && t.floor !== undefined ? { similarity: novelty.similarity[i] as number, floor: t.floor } : undefined,
      ),
  );
  let answered = 0;
  let right = 0;
  let unsure = 0;
  let none = 0;
  let negatives = 0;
  let rejected = 0;
  decisions.forEach((d, i) => {
    if (truth[i] === noneIndex) {
      negatives++;
      if (d.kind !== "label") rejected++;
    } else if (d.kind === "label") {
      answered++;
      if (d.index === truth[i]) right++;
    } else if (d.kind === "none") none++;
    else unsure++;
  });
  const n = Math.max(1, probs.length - negatives);
  return {
    answered: answered / n,
    answeredAccuracy: answered > 0 ? right / answered : 0,
    unsure: unsure / n,
    none: none / n,
    ...(noneIndex === undefined ? {} : { negativesRejected: negatives > 0 ? rejected / negatives : 0 }),
  };
}

export function thresholdValues(t: Record<string, LabelThreshold>): Record<string, number> {
  return Object.fromEntries(Object.entries(t).map(([l, v]) => [l, v.threshold]));
}
