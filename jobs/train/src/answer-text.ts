import type { Answer } from "#shared/answer.ts";

const pct = (v: number) => `${(v * 100).toFixed(1)} %`;

/**
 * One classify answer as a sentence for people (`edgetune classify`): the label it gives, or plainly
 * "unsure" or "none of these" (and why), then the scores. A worker older than the answer fields gets its scores only.
 */
export function answerText(a: Partial<Omit<Answer, "predictions">> & Pick<Answer, "predictions">): string {
  const scores = a.predictions.map((p) => `${p.label} ${pct(p.score)}`).join(", ");
  const top = a.predictions[0];
  if (a.none) return `none of these (${noneReason(a)})${scores ? `; labels: ${scores}` : ""}`;
  if (a.unsure && top)
    return `unsure: the best label, ${top.label} ${pct(top.score)}, is below its threshold${a.threshold === null || a.threshold === undefined ? "" : ` ${pct(a.threshold)}`}; ${scores}`;
  if (a.label && top)
    return `${a.label} (${pct(top.score)}${a.threshold ? `, threshold ${pct(a.threshold)}` : ""})${a.predictions.length > 1 ? `; ${scores}` : ""}`;
  return scores;
}

/** Why an answer is none of these: its features unlike every label's training images (the novelty floor), or the none-of-these class. */
function noneReason(a: Partial<Pick<Answer, "noneBy" | "similarity" | "similarityFloor">>): string {
  if (a.noneBy === "novelty")
    return `unlike every label's training images: similarity ${a.similarity?.toFixed(3) ?? "?"}, below ${a.similarityFloor?.toFixed(3) ?? "its floor"}`;
  return "the model's none-of-these class won";
}
