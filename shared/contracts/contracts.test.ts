import { describe, expect, it } from "vitest";
import { ContractError } from "../errors.ts";
import { artifactMetadataSchema, MAX_SERVED_FILES, pointerSchema, type Served, sameServed, servedFiles, servedSchema } from "./artifact.ts";
import { baseMetadataSchema } from "./base.ts";
import { classifyDatasetKeys, manifestSchema } from "./dataset.ts";
import { validMetadata } from "./fixtures.ts";
import { parseContract, parseContractJson } from "./parse.ts";

const sha = "a".repeat(64);

function fieldOf(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    if (e instanceof ContractError) return e.field;
    throw e;
  }
  throw new Error("expected a ContractError");
}

describe("artifact metadata", () => {
  it("accepts a complete record and fills defaults", () => {
    const m = parseContract(artifactMetadataSchema, validMetadata(), "metadata");
    expect(m.labels).toEqual(["cat", "dog"]);
    expect(m.preprocessing.fit).toBe("center-crop");
  });

  it("names the field that is wrong", () => {
    const missingLabels = { ...validMetadata(), labels: undefined };
    expect(fieldOf(() => parseContract(artifactMetadataSchema, missingLabels, "metadata"))).toBe("labels");
    const oneLabel = { ...validMetadata(), labels: ["cat"] };
    expect(fieldOf(() => parseContract(artifactMetadataSchema, oneLabel, "metadata"))).toBe("labels");
    const dupLabel = { ...validMetadata(), labels: ["cat", "dog", "cat"] };
    expect(fieldOf(() => parseContract(artifactMetadataSchema, dupLabel, "metadata"))).toBe("labels.2");
    const badSha = validMetadata();
    (badSha.files[1] as { sha256: string }).sha256 = "xyz";
    expect(fieldOf(() => parseContract(artifactMetadataSchema, badSha, "metadata"))).toBe("files.1.sha256");
    const badPrep = { ...validMetadata(), preprocessing: { version: 7, normalization: "0-1" } };
    expect(fieldOf(() => parseContract(artifactMetadataSchema, badPrep, "metadata"))).toBe("preprocessing.version");
    const noModel = {
      ...validMetadata(),
      files: [
        { path: "a.bin", sha256: sha, bytes: 1 },
        { path: "b.bin", sha256: sha, bytes: 1 },
      ],
    };
    expect(fieldOf(() => parseContract(artifactMetadataSchema, noModel, "metadata"))).toBe("files");
    const traversal = validMetadata();
    (traversal.files[1] as { path: string }).path = "../../other/model.json";
    expect(fieldOf(() => parseContract(artifactMetadataSchema, traversal, "metadata"))).toBe("files.1.path");
  });

  it("a novelty floor needs its class-means file and one row per label but the rejection class", () => {
    const novelty = { method: "cosine-class-mean", rows: 2, features: 8, floor: 0.4, heldOutRejected: 0.05 } as const;
    const withFile = { ...validMetadata(), novelty, files: [...validMetadata().files, { path: "class-means.bin", sha256: sha, bytes: 64 }] };
    expect(parseContract(artifactMetadataSchema, withFile, "metadata").novelty).toEqual(novelty);
    expect(fieldOf(() => parseContract(artifactMetadataSchema, { ...withFile, files: validMetadata().files }, "metadata"))).toBe("files");
    const withNone = { ...withFile, labels: ["_none", "cat", "dog"], noneLabel: "_none" };
    expect(parseContract(artifactMetadataSchema, withNone, "metadata").novelty?.rows).toBe(2);
    expect(fieldOf(() => parseContract(artifactMetadataSchema, { ...withNone, novelty: { ...novelty, rows: 3 } }, "metadata"))).toBe("novelty.rows");
  });

  it("says which field in its message", () => {
    expect(() => parseContract(artifactMetadataSchema, { ...validMetadata(), input: { size: 100, channels: 3 } }, "model metadata")).toThrow(
      /model metadata: field "input.size"/,
    );
    expect(() => parseContractJson(artifactMetadataSchema, '{"schemaVersion":', "metadata.json")).toThrow(/not valid JSON/);
  });
});

describe("artifact metadata: answer rules (calibration, thresholds, none of these)", () => {
  it("loads versions written before them, and checks the none-of-these label is one of the labels", () => {
    const old = validMetadata();
    expect(artifactMetadataSchema.parse(old)).not.toHaveProperty("thresholds");
    const withRules = {
      ...old,
      calibration: { method: "temperature", temperature: 1.7, folds: 5, eceBefore: 0.08, eceAfter: 0.02 },
      thresholds: { policy: "f1", byLabel: { [old.labels[0] as string]: 0.6 } },
      noneLabel: old.labels[1],
    };
    expect(artifactMetadataSchema.parse(withRules).thresholds?.byLabel).toEqual({ [old.labels[0] as string]: 0.6 });
    expect(() => parseContract(artifactMetadataSchema, { ...withRules, noneLabel: "_none" }, "model metadata")).toThrow(
      /field "noneLabel" must be one of the labels/,
    );
    expect(() => parseContract(artifactMetadataSchema, { ...withRules, calibration: { ...withRules.calibration, temperature: 0 } }, "model metadata")).toThrow(
      /field "calibration\.temperature"/,
    );
  });
});

describe("pointer", () => {
  it("requires a version id and the metadata sha256", () => {
    const ok = { schemaVersion: 1, version: "v0123456789ab", metadataSha256: sha, promotedAt: "2026-11-27T10:00:00Z", previous: null, reason: "first" };
    expect(parseContract(pointerSchema, ok, "pointer").version).toBe("v0123456789ab");
    expect(fieldOf(() => parseContract(pointerSchema, { ...ok, version: "latest" }, "pointer"))).toBe("version");
    expect(fieldOf(() => parseContract(pointerSchema, { ...ok, metadataSha256: "" }, "pointer"))).toBe("metadataSha256");
  });

  it("lists what its version is served from as the metadata says, and tells any difference", () => {
    const whole = validMetadata();
    const head = [
      { path: "head.json", sha256: "b".repeat(64), bytes: 5 },
      { path: "head-shard1of1.bin", sha256: "c".repeat(64), bytes: 7 },
    ];
    const split = {
      ...whole,
      files: [...whole.files, ...head, { path: "report.json", sha256: sha, bytes: 3 }],
      split: { baseManifestSha256: "d".repeat(64), features: 8 },
    };
    const served = servedFiles(split) as Extract<Served, { form: "split" }>;
    expect(served).toEqual({ form: "split", files: head, base: { sha256: whole.base.sha256, size: 128, manifestSha256: "d".repeat(64) } });
    // A version without `split` is served whole: its model and shards, never its reports.
    expect(servedFiles({ ...split, split: undefined })).toEqual({ form: "whole", files: whole.files });
    const ok = { schemaVersion: 1, version: "v0123456789ab", metadataSha256: sha, promotedAt: "2026-11-27T10:00:00Z", previous: null, reason: "first" };
    expect(parseContract(pointerSchema, { ...ok, served }, "pointer").served).toEqual(served);
    // A `served` this code cannot read (a later form, too many files) leaves the pointer readable, as if it had none:
    // a worker then fetches what the metadata lists. servedFiles' own output is still checked strictly.
    const tooMany = { ...served, files: Array.from({ length: MAX_SERVED_FILES + 1 }, (_, i) => ({ ...head[0], path: `s${i}.bin` })) };
    for (const odd of [{ ...served, form: "half" }, tooMany, "split"]) {
      const read = parseContract(pointerSchema, { ...ok, served: odd }, "pointer");
      expect(read.version).toBe(ok.version);
      expect(read.served).toBeUndefined();
    }
    expect(fieldOf(() => parseContract(servedSchema, { ...served, form: "half" }, "served"))).toBe("form");
    expect(fieldOf(() => parseContract(servedSchema, tooMany, "served"))).toBe("files");
    // The same files in another order are the same; any other file, size, base or form is not.
    expect(sameServed(served, { ...served, files: [...head].reverse() })).toBe(true);
    const changed = [
      { ...served, files: [head[0], { ...head[1], sha256: "e".repeat(64) }] },
      { ...served, files: [head[0], { ...head[1], bytes: 8 }] },
      { ...served, files: [head[0]] },
      { ...served, base: { ...served.base, size: 160 } },
      { form: "whole", files: head },
    ] as Served[];
    for (const other of changed) expect(sameServed(served, other)).toBe(false);
  });
});

describe("base metadata", () => {
  it("rejects an unknown normalisation with the field name", () => {
    const base = {
      schemaVersion: 1,
      id: "my-base",
      description: "x",
      featureLayer: "out_relu",
      inputSize: 224,
      normalization: "caffe",
      licence: "MIT",
      source: "test",
      sha256: sha,
      files: [
        { path: "model.json", sha256: sha, bytes: 1 },
        { path: "w.bin", sha256: sha, bytes: 1 },
      ],
    };
    expect(fieldOf(() => parseContract(baseMetadataSchema, base, "base"))).toBe("normalization");
    expect(parseContract(baseMetadataSchema, { ...base, normalization: "minus1-1" }, "base").id).toBe("my-base");
  });
});

describe("dataset layout", () => {
  it("reads folder-per-label datasets and ignores what is not an image", () => {
    const { layout, entries } = classifyDatasetKeys([
      "manifest.json",
      "cats/a.jpg",
      "cats/sub/b.PNG",
      "dogs/c.webp",
      "dogs/notes.txt",
      "readme.md",
      ".DS_Store",
      "dogs/.hidden.jpg",
      "__MACOSX/cats/a.jpg",
    ]);
    expect(layout).toBe("flat");
    const images = entries.filter((e) => e.kind === "image");
    expect(images.map((e) => [e.key, e.kind === "image" && e.label])).toEqual([
      ["cats/a.jpg", "cats"],
      ["cats/sub/b.PNG", "cats"],
      ["dogs/c.webp", "dogs"],
    ]);
    expect(entries.filter((e) => e.kind === "ignored").map((e) => e.key)).toEqual([
      "dogs/notes.txt",
      "readme.md",
      ".DS_Store",
      "dogs/.hidden.jpg",
      "__MACOSX/cats/a.jpg",
    ]);
  });

  it("recognises the split layout, with validation as val", () => {
    const { layout, entries } = classifyDatasetKeys(["train/ants/1.jpg", "validation/bees/2.jpg", "test/ants/3.gif", "train/x.jpg"]);
    expect(layout).toBe("split");
    expect(entries).toEqual([
      { kind: "image", key: "train/ants/1.jpg", label: "ants", split: "train" },
      { kind: "image", key: "validation/bees/2.jpg", label: "bees", split: "val" },
      { kind: "image", key: "test/ants/3.gif", label: "ants", split: "test" },
      { kind: "ignored", key: "train/x.jpg", reason: "not inside <split>/<label>/" },
    ]);
  });

  it("treats folders named like Object.prototype members as labels, not as splits", () => {
    const { layout, entries } = classifyDatasetKeys(["__proto__/a.jpg", "constructor/b.jpg", "toString/c.jpg"]);
    expect(layout).toBe("flat");
    expect(entries.map((e) => e.kind === "image" && e.label)).toEqual(["__proto__", "constructor", "toString"]);
  });

  it("validates manifests and fills defaults", () => {
    expect(parseContract(manifestSchema, {}, "manifest")).toEqual({ schemaVersion: 1, ignoreLabels: [] });
    expect(fieldOf(() => parseContract(manifestSchema, { imageSize: 100 }, "manifest"))).toBe("imageSize");
    expect(fieldOf(() => parseContract(manifestSchema, { strategy: "all" }, "manifest"))).toBe("strategy");
  });
});
