import * as tf from "@tensorflow/tfjs";
import { argmax } from "../release/evaluate.ts";
import { crossFitted, stratifiedFolds } from "./folds.ts";
import { LAYER_NAMES } from "./head.ts";

/**
 * Temperature scaling (Guo et al. 2017): the softmax's logits divided by one number T, fitted to
 * minimise the negative log-likelihood of held-out answers. It changes no argmax (so no accuracy),
 * only how far a score can be trusted as a probability. T is folded into the head's last dense layer
 * (kernel and bias divided by T), so the exported model — and every consumer of it, the edge, an ONNX
 * export, an old client — gives calibrated scores with nothing new to apply.
 *
 * Honesty: the held-out split both fits T and measures it, so it is cross-fitted. The held-out rows
 * are split into k stratified folds; each fold's scores are calibrated with a T fitted on the other
 * folds only, and the evaluation (ECE, thresholds' effect, confidence histogram) reads those
 * out-of-fold scores. The T shipped is then fitted on all held-out rows — the usual cross-validation
 * bargain: the estimate is for the procedure, the model gets all the data. Fitting T on out-of-fold
 * predictions of the training split instead would mean k extra trainings of the head, and the
 * training rows are augmented views the model saw, whose scores are over-confident in another way.
 *
 * What one number cannot do: reshape. A head whose confidence is misshapen (right at the top, wrong in
 * the middle) stays so at any T — with the head's former L2 of 1e-4, hymenoptera's held-out ECE was
 * 0.060 at the T that minimised it in hindsight. Fitting T by the Brier score instead of NLL (bounded,
 * so a few confident mistakes weigh less), or on out-of-fold predictions of the training images as
 * well, moved T by less than that mattered (bench/RESULTS.md, "Calibration"); the head's weight decay
 * is what keeps its logits in shape (config.ts `l2`; Guo et al. 2017, §3).
 */
export const CALIBRATION_FOLDS = 5;
/** Equal-width confidence bins of the expected calibration error and the reliability diagram. */
export const ECE_BINS = 15;

export interface ReliabilityBin {
  /** Answers whose top score falls in [lower, upper). */
  lower: number;
  upper: number;
  count: number;
  /** Mean top score and share of correct answers in the bin (0 when empty). */
  confidence: number;
  accuracy: number;
}

export interface Calibration {
  temperature: number;
  folds: number;
  eceBefore: number;
  eceAfter: number;
  reliability: { before: ReliabilityBin[]; after: ReliabilityBin[] };
  /** Every held-out row's scores, calibrated out of fold (in the rows' order). */
  probs: Float32Array[];
}

const TINY = 1e-30;

/** Scores with their logits divided by `t`: softmax(log p / t) (log p is the logits up to a constant). */
export function withTemperature(p: Float32Array, t: number): Float32Array {
  const z = Array.from(p, (v) => Math.log(Math.max(v, TINY)) / t);
  const max = Math.max(...z);
  const e = z.map((v) => Math.exp(v - max));
  const sum = e.reduce((a, b) => a + b, 0);
  return Float32Array.from(e, (v) => v / sum);
}

function nll(probs: readonly Float32Array[], truth: readonly number[], rows: readonly number[], t: number): number {
  let loss = 0;
  for (const i of rows) loss -= Math.log(Math.max(withTemperature(probs[i] as Float32Array, t)[truth[i] as number] as number, TINY));
  return loss / Math.max(1, rows.length);
}

/** The temperatures searched: wide enough for any head seen, bounded so a few rows cannot make scores absurd. */
export const TEMPERATURE_RANGE = [0.25, 20] as const;

/**
 * The temperature with the least held-out NLL, by golden-section search over log T in TEMPERATURE_RANGE
 * (the NLL is unimodal in T). Rows without a single mistake say nothing about confidence (their NLL
 * falls forever as T shrinks): then, as with no rows, 1 — nothing changes.
 */
export function fitTemperature(probs: readonly Float32Array[], truth: readonly number[], rows: readonly number[] = truth.map((_, i) => i)): number {
  if (!rows.some((i) => argmax(probs[i] as Float32Array) !== truth[i])) return 1;
  const g = (Math.sqrt(5) - 1) / 2;
  let lo = Math.log(TEMPERATURE_RANGE[0]);
  let hi = Math.log(TEMPERATURE_RANGE[1]);
  let a = hi - g * (hi - lo);
  let b = lo + g * (hi - lo);
  let fa = nll(probs, truth, rows, Math.exp(a));
  let fb = nll(probs, truth, rows, Math.exp(b));
  while (hi - lo > 1e-4) {
    if (fa < fb) {
      hi = b;
      b = a;
      fb = fa;
      a = hi - g * (hi - lo);
      fa = nll(probs, truth, rows, Math.exp(a));
    } else {
      lo = a;
      a = b;
      fa = fb;
      b = lo + g * (hi - lo);
      fb = nll(probs, truth, rows, Math.exp(b));
    }
  }
  return Math.exp((lo + hi) / 2);
}

/** The reliability diagram's bins: per confidence bin, how many answers, their mean score and their accuracy. */
export function reliability(probs: readonly Float32Array[], truth: readonly number[], bins = ECE_BINS): ReliabilityBin[] {
  const out = Array.from({ length: bins }, (_, b) => ({ lower: b / bins, upper: (b + 1) / bins, count: 0, confidence: 0, accuracy: 0 }));
  probs.forEach((p, i) => {
    const top = argmax(p);
    const score = p[top] as number;
    const bin = out[Math.min(bins - 1, Math.floor(score * bins))] as ReliabilityBin;
    bin.count++;
    bin.confidence += score;
    bin.accuracy += top === truth[i] ? 1 : 0;
  });
  for (const bin of out)
    if (bin.count > 0) {
      bin.confidence /= bin.count;
      bin.accuracy /= bin.count;
    }
  return out;
}

/** Expected calibration error: the count-weighted mean gap between confidence and accuracy over the bins. */
export function expectedCalibrationError(probs: readonly Float32Array[], truth: readonly number[], bins = ECE_BINS): number {
  const n = probs.length;
  if (n === 0) return 0;
  return reliability(probs, truth, bins).reduce((e, b) => e + (b.count / n) * Math.abs(b.confidence - b.accuracy), 0);
}

/** Fits T (cross-fitted for the evaluation, then on every row for the model); see the module comment. */
export function calibrate(probs: readonly Float32Array[], truth: readonly number[], seed: number, k = CALIBRATION_FOLDS): Calibration {
  const split = stratifiedFolds(truth, k, seed);
  const outOfFold = crossFitted(
    probs.length,
    split,
    (rows) => fitTemperature(probs, truth, rows),
    (t, i) => withTemperature(probs[i] as Float32Array, t),
  );
  const temperature = fitTemperature(probs, truth);
  return {
    temperature,
    folds: split.folds,
    eceBefore: expectedCalibrationError(probs, truth),
    eceAfter: expectedCalibrationError(outOfFold, truth),
    reliability: { before: reliability(probs, truth), after: reliability(outOfFold, truth) },
    probs: outOfFold,
  };
}

/**
 * Folds T into the head: the last dense layer's kernel and bias divided by T, so softmax(z/T) is what
 * the exported model computes. The head's layers are the ones the exported model is built from.
 */
export function foldTemperature(head: readonly tf.layers.Layer[], temperature: number): void {
  const logits = head.find((l) => l.name === LAYER_NAMES.logits);
  if (!logits) throw new Error("the head has no logits layer");
  const scaled = logits.getWeights().map((w) => tf.tidy(() => tf.div(w, temperature)));
  logits.setWeights(scaled);
  for (const w of scaled) w.dispose();
}
