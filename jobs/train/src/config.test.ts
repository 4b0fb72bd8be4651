import { describe, expect, it } from "vitest";
import { mergeConfig, resolveOptions, type TrainInput } from "./config.ts";

describe("train --config with flags", () => {
  // What commander hands over when only --dataset and --epochs are given: every other flag undefined.
  const flags: TrainInput = {
    dataset: "pets",
    model: undefined,
    seed: undefined,
    imageSize: undefined,
    head: { epochs: 7, learningRate: undefined, units: undefined },
    fineTune: { epochs: undefined, learningRate: undefined },
  };

  it("keeps the file's values where no flag was given, top level and nested", () => {
    const file: Partial<TrainInput> = { model: "pets-v2", seed: 11, imageSize: 160, head: { units: 64, epochs: 3 }, fineTune: { epochs: 2 } };
    const options = resolveOptions(mergeConfig(file, flags));
    expect(options.model).toBe("pets-v2");
    expect(options.seed).toBe(11);
    expect(options.imageSize).toBe(160);
    expect(options.head.units).toBe(64);
    expect(options.fineTune.epochs).toBe(2);
  });

  it("lets a given flag win over the file", () => {
    const merged = mergeConfig({ head: { epochs: 3 }, dataset: "other" }, flags);
    expect(merged.head?.epochs).toBe(7);
    expect(merged.dataset).toBe("pets");
  });
});
