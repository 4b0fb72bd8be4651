import { describe, expect, it } from "vitest";
import { checkTrainable } from "../../jobs/train/src/dataset/read.ts";
import { labelProblem, labelSkeleton, lookAlikes, newLabelSchema } from "./dataset.ts";

/** New labels (dataset folders, `review --as`, console decisions) are safe to show and cannot pass for one another. */
describe("labels", () => {
  it("refuses control characters, invisible format characters and non-NFC forms, and accepts ordinary ones", () => {
    expect(labelProblem("food\u200b")).toMatch(/invisible format character/);
    expect(labelProblem("cat\u202egod")).toMatch(/invisible format character/);
    expect(labelProblem("cat\u001b[2J")).toMatch(/control character/);
    expect(labelProblem("cat\u009b")).toMatch(/control character/);
    expect(labelProblem("cafe\u0301")).toBe('is not in Unicode normal form NFC (rename it "café")');
    for (const ok of ["café", "hot dog", "猫", "élan-2", "Ωmega"]) expect([ok, labelProblem(ok)]).toEqual([ok, null]);
    expect(newLabelSchema.safeParse("food\u200b").success).toBe(false);
    expect(newLabelSchema.safeParse("food").success).toBe(true);
  });

  it("finds look-alikes: case, width, ligatures, zero-width, and common Cyrillic and Greek letters", () => {
    expect(lookAlikes(["food", "f\u043e\u043ed"])).toEqual([["food", "f\u043e\u043ed"]]); // Cyrillic о
    expect(lookAlikes(["Cat", "cat"])).toEqual([["Cat", "cat"]]);
    expect(lookAlikes(["fish", "\ufb01sh"])).toEqual([["fish", "\ufb01sh"]]); // the ﬁ ligature
    expect(lookAlikes(["\uff43\uff41\uff54", "cat"])).toEqual([["\uff43\uff41\uff54", "cat"]]); // full-width
    expect(lookAlikes(["kayak", "\u03baayak"])).toEqual([["kayak", "\u03baayak"]]); // Greek κ
    expect(labelSkeleton("Fo\u200bod")).toBe("food");
    expect(lookAlikes(["cat", "dog", "cats", "猫"])).toEqual([]);
  });

  it("a dataset with such label folders is refused before training, naming both folders", () => {
    const images = (labels: string[]) =>
      labels.flatMap((label) => [0, 1, 2, 3].map((n) => ({ key: `${label}/${n}.png`, id: `${label}${n}`, label, split: "train" as const })));
    expect(() => checkTrainable("pets", ["food", "food\u200b"], images(["food", "food\u200b"]))).toThrow(
      'Dataset pets: label folder "food\u200b" has an invisible format character (zero-width or direction mark); rename the folder.',
    );
    expect(() => checkTrainable("pets", ["food", "F\u043e\u043ed"], images(["food", "F\u043e\u043ed"]))).toThrow(
      'Dataset pets: label folders "food" and "F\u043e\u043ed" look alike (they differ only in case, width or look-alike letters); merge or rename one.',
    );
  });
});
