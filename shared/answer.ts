import type { ArtifactMetadata } from "./contracts/artifact.ts";

/**
 * What a classification answers, on both sides (the training job measures it on held-out images, the
 * edge returns it): a label, "unsure" (the top label's score is below that label's threshold) or
 * "none of these" (the dataset's rejection class scored highest, or the image's features are unlike
 * every label's: shared/novelty.ts). Thresholds are per label, from the version's metadata (computed at
 * training) or one number for every label (`?threshold=`).
 */
export type Decision =
  | { kind: "label"; index: number }
  | { kind: "unsure"; index: number }
  /** `by`: the rejection class scored highest, or the features fell below the novelty floor. */
  | { kind: "none"; index: number; by: "class" | "novelty" };

/** An image's similarity to the labels' training images and the version's floor for it (shared/novelty.ts). */
export interface NoveltyCheck {
  similarity: number;
  floor: number;
}

export function decide(
  scores: ArrayLike<number>,
  labels: readonly string[],
  thresholds: Readonly<Record<string, number>> | number,
  noneIndex?: number,
  novelty?: NoveltyCheck,
): Decision {
  let top = 0;
  for (let i = 1; i < scores.length; i++) if ((scores[i] as number) > (scores[top] as number)) top = i;
  if (top === noneIndex) return { kind: "none", index: top, by: "class" };
  if (novelty && novelty.similarity < novelty.floor) return { kind: "none", index: top, by: "novelty" };
  const threshold = typeof thresholds === "number" ? thresholds : (thresholds[labels[top] as string] ?? 0);
  return (scores[top] as number) >= threshold ? { kind: "label", index: top } : { kind: "unsure", index: top };
}

type Rules = Pick<ArtifactMetadata, "labels" | "thresholds" | "noneLabel" | "novelty">;

/** The version's answer rules; absent in versions trained before them (no thresholds, no rejection class, no novelty floor). */
export function answerRules(m: Rules): {
  thresholds: Record<string, number>;
  noneIndex: number | undefined;
} {
  const noneIndex = m.noneLabel === undefined ? undefined : m.labels.indexOf(m.noneLabel);
  return { thresholds: m.thresholds?.byLabel ?? {}, noneIndex: noneIndex === -1 ? undefined : noneIndex };
}

/** What a model gave for one image: its scores, and its features' similarity when the version has a novelty floor. */
export interface Prediction {
  scores: Float32Array;
  similarity?: number;
}

function noveltyOf(p: Prediction, m: Rules): NoveltyCheck | undefined {
  return m.novelty && p.similarity !== undefined ? { similarity: p.similarity, floor: m.novelty.floor } : undefined;
}

/** What the classify API returns besides its timings. */
export interface Answer {
  /** Best first; the rejection class is not a label and is not listed. */
  predictions: { label: string; score: number }[];
  /** The answer: the top label when it clears its threshold; null when unsure or none of these. */
  label: string | null;
  unsure: boolean;
  none: boolean;
  /** The threshold the top label was held to (null: none of these). */
  threshold: number | null;
  /** Why none of these: the rejection class won (`class`) or the image is unlike every label's training images (`novelty`). */
  noneBy?: "class" | "novelty";
  /** The image's similarity to the nearest label's training images and the floor below which it is none of these (versions with one). */
  similarity?: number;
  similarityFloor?: number;
}

/** The answer to one image's scores under a version's rules; `threshold` (the API's `?threshold=`) replaces every label's. */
export function answer(prediction: Prediction, metadata: Rules, options: { topK: number; threshold?: number }): Answer {
  const { labels } = metadata;
  const { scores } = prediction;
  const rules = answerRules(metadata);
  const novelty = noveltyOf(prediction, metadata);
  const d = decide(scores, labels, options.threshold ?? rules.thresholds, rules.noneIndex, novelty);
  const predictions = Array.from(scores, (score, i) => ({ label: labels[i] as string, score, i }))
    .filter((p) => p.i !== rules.noneIndex)
    .sort((a, b) => b.score - a.score)
    .slice(0, options.topK)
    .map(({ label, score }) => ({ label, score }));
  const top = labels[d.index] as string;
  return {
    predictions,
    label: d.kind === "label" ? top : null,
    unsure: d.kind === "unsure",
    none: d.kind === "none",
    threshold: d.kind === "none" ? null : (options.threshold ?? rules.thresholds[top] ?? 0),
    ...(d.kind === "none" ? { noneBy: d.by } : {}),
    ...(novelty ? { similarity: round(novelty.similarity), similarityFloor: round(novelty.floor) } : {}),
  };
}

/**
 * Whether the version's own rules answer "unsure" (never a caller's `?threshold=`: a client must not
 * decide what is stored for review); undefined for a version trained before per-label thresholds.
 */
export function versionUnsure(prediction: Prediction, metadata: Rules): boolean | undefined {
  if (!metadata.thresholds) return undefined;
  const rules = answerRules(metadata);
  return decide(prediction.scores, metadata.labels, rules.thresholds, rules.noneIndex, noveltyOf(prediction, metadata)).kind === "unsure";
}

const round = (v: number) => Math.round(v * 1e4) / 1e4;
