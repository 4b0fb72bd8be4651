import { describe, expect, it } from "vitest";
import { answerText } from "./answer-text.ts";

describe("answerText", () => {
  const predictions = [
    { label: "cat", score: 0.55 },
    { label: "dog", score: 0.3 },
  ];
  it("says the label, unsure or none of these in plain words", () => {
    expect(answerText({ predictions, label: "cat", unsure: false, none: false, threshold: 0.5 })).toBe(
      "cat (55.0 %, threshold 50.0 %); cat 55.0 %, dog 30.0 %",
    );
    expect(answerText({ predictions, label: null, unsure: true, none: false, threshold: 0.7 })).toBe(
      "unsure: the best label, cat 55.0 %, is below its threshold 70.0 %; cat 55.0 %, dog 30.0 %",
    );
    expect(answerText({ predictions, label: null, unsure: false, none: true, threshold: null })).toBe(
      "none of these (the model's none-of-these class won); labels: cat 55.0 %, dog 30.0 %",
    );
  });
  it("says why an answer is none of these: the novelty floor or the none-of-these class", () => {
    const none = { predictions, label: null, unsure: false, none: true, threshold: null, similarityFloor: 0.4 };
    expect(answerText({ ...none, noneBy: "novelty", similarity: 0.123 })).toBe(
      "none of these (unlike every label's training images: similarity 0.123, below 0.400); labels: cat 55.0 %, dog 30.0 %",
    );
    expect(answerText({ ...none, noneBy: "class", similarity: 0.6 })).toBe(
      "none of these (the model's none-of-these class won); labels: cat 55.0 %, dog 30.0 %",
    );
  });
  it("shows only the scores from a worker that predates the answer fields", () => {
    expect(answerText({ predictions })).toBe("cat 55.0 %, dog 30.0 %");
  });
});
