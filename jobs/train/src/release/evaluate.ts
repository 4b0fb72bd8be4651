import type { Metrics } from "#shared/contracts/artifact.ts";
import { CONFIDENCE_BINS, confidenceBin } from "#shared/contracts/capture.ts";

/**
 * Classification metrics on the held-out split: accuracy, per-class precision/recall/F1, the
 * confusion matrix (rows = true label, columns = predicted) and the most confidently wrong examples.
 */
export interface Evaluation {
  metrics: Metrics;
  confusion: number[][];
  mistakes: { key: string; label: string; predicted: string; score: number }[];
  /** The top score of every held-out image, ascending: the monitor's exact share under any threshold. */
  topScores: number[];
}

export function evaluate(
  labels: readonly string[],
  truth: readonly number[],
  probabilities: readonly Float32Array[],
  keysOf: readonly string[],
  loss?: number,
  topMistakes = 12,
): Evaluation {
  const k = labels.length;
  const confusion = Array.from({ length: k }, () => new Array<number>(k).fill(0));
  const mistakes: Evaluation["mistakes"] = [];
  const confidence = new Array<number>(CONFIDENCE_BINS).fill(0);
  const topScores: number[] = [];
  let correct = 0;
  truth.forEach((t, i) => {
    const p = probabilities[i] as Float32Array;
    const predicted = argmax(p);
    const bin = confidenceBin(p[predicted] as number);
    confidence[bin] = (confidence[bin] ?? 0) + 1;
    topScores.push(p[predicted] as number);
    (confusion[t] as number[])[predicted] = ((confusion[t] as number[])[predicted] ?? 0) + 1;
    if (predicted === t) correct++;
    else mistakes.push({ key: keysOf[i] as string, label: labels[t] as string, predicted: labels[predicted] as string, score: p[predicted] as number });
  });
  const perClass: Metrics["perClass"] = {};
  labels.forEach((label, c) => {
    const tp = (confusion[c] as number[])[c] as number;
    const support = (confusion[c] as number[]).reduce((a, b) => a + b, 0);
    const predictedAs = confusion.reduce((a, row) => a + (row[c] as number), 0);
    const precision = predictedAs > 0 ? tp / predictedAs : 0;
    const recall = support > 0 ? tp / support : 0;
    const f1 = precision + recall > 0 ? (2 * precision * recall) / (precision + recall) : 0;
    perClass[label] = { precision, recall, f1, support };
  });
  mistakes.sort((a, b) => b.score - a.score);
  return {
    metrics: { accuracy: truth.length > 0 ? correct / truth.length : 0, loss, evaluatedOn: truth.length, perClass, confidence },
    confusion,
    mistakes: mistakes.slice(0, topMistakes),
    topScores: topScores.sort((a, b) => a - b),
  };
}

export function argmax(values: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < values.length; i++) if ((values[i] as number) > (values[best] as number)) best = i;
  return best;
}
