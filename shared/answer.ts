/**
 * What a classification answers, on both sides (the training job measures it on held-out images, the
 * edge returns it): a label, "unsure" (the top label's score is below that label's threshold) or
 * "none of these" (the dataset's rejection class scored highest). Thresholds are per label, from the
 * version's metadata (computed at training) or one number for every label (`?threshold=`).
 */
export type Decision = { kind: "label"; index: number } | { kind: "unsure"; index: number } | { kind: "none"; index: number };

export function decide(
  scores: ArrayLike<number>,
  labels: readonly string[],
  thresholds: Readonly<Record<string, number>> | number,
  noneIndex?: number,
): Decision {
  let top = 0;
  for (let i = 1; i < scores.length; i++) if ((scores[i] as number) > (scores[top] as number)) top = i;
  if (top === noneIndex) return { kind: "none", index: top };
  const threshold = typeof thresholds === "number" ? thresholds : (thresholds[labels[top] as string] ?? 0);
  return (scores[top] as number) >= threshold ? { kind: "label", index: top } : { kind: "unsure", index: top };
}
