import { z } from "zod";
import { imageSizeSchema, nameSchema, strategySchema } from "./common.ts";

/**
 * Dataset contract.
 *
 * A dataset lives under `datasets/<name>/` in one of two layouts:
 * - folder per label: `datasets/<name>/<label>/<file>`;
 * - split: `datasets/<name>/{train,val|validation,test}/<label>/<file>`, used as given.
 * Files in deeper folders count for the label folder above them. Which layout applies is decided by
 * the first-level folders: if every one of them is a split name, the dataset is split.
 *
 * Image files are recognised by extension (`IMAGE_EXTENSIONS`) and then by their bytes when decoded;
 * hidden files, `__MACOSX` folders and anything else are ignored and listed in the training report.
 *
 * `datasets/<name>/manifest.json`, written last by the uploader, marks the dataset complete: its
 * creation is what triggers training. It may carry training options.
 */
export const IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".webp", ".gif"] as const;
export const SPLIT_FOLDERS = { train: "train", val: "val", validation: "val", test: "test" } as const;
export type Split = "train" | "val" | "test";
export const MANIFEST_FILE = "manifest.json";

export const labelSchema = z
  .string()
  .min(1)
  .max(100)
  .refine((s) => !s.startsWith(".") && !s.includes("/"), "must be a plain folder name");

export const manifestSchema = z.object({
  /** Contract version of this file. */
  schemaVersion: z.literal(1).default(1),
  /** Base model id (see `bases/`), defaults to `auto` (jobs/train/src/model/bases.ts). */
  base: z.string().min(1).optional(),
  strategy: strategySchema.optional(),
  imageSize: imageSizeSchema.optional(),
  epochs: z.number().int().min(1).max(500).optional(),
  /** Label folders to leave out of training. */
  ignoreLabels: z.array(labelSchema).default([]),
  /** Optional statement of how many images were uploaded; training refuses a dataset that has fewer. */
  imageCount: z.number().int().min(0).optional(),
  /** Model name to train into; defaults to the dataset name. */
  model: nameSchema.optional(),
});
export type DatasetManifest = z.output<typeof manifestSchema>;

/** Where one object of a dataset belongs, or why it is left out. */
export type DatasetEntry = { kind: "image"; key: string; label: string; split?: Split } | { kind: "ignored"; key: string; reason: string };

/**
 * Classifies every key under a dataset prefix. `relativeKeys` are keys with `datasets/<name>/`
 * stripped. Pure: the S3 listing is done by the caller.
 */
export function classifyDatasetKeys(relativeKeys: readonly string[]): { layout: "flat" | "split"; entries: DatasetEntry[] } {
  const firstLevel = new Set<string>();
  for (const key of relativeKeys) {
    const parts = key.split("/");
    if (parts.length >= 2 && !isHidden(parts[0] as string)) firstLevel.add((parts[0] as string).toLowerCase());
  }
  // Own keys only: folders named "__proto__" or "constructor" are labels, not splits.
  const split = firstLevel.size > 0 && [...firstLevel].every((f) => Object.hasOwn(SPLIT_FOLDERS, f));
  const entries: DatasetEntry[] = [];
  for (const key of relativeKeys) {
    if (key === MANIFEST_FILE || key.endsWith("/")) continue;
    const parts = key.split("/");
    if (parts.some(isHidden)) {
      entries.push({ kind: "ignored", key, reason: "hidden file or folder" });
      continue;
    }
    const labelIndex = split ? 1 : 0;
    if (parts.length < labelIndex + 2) {
      entries.push({ kind: "ignored", key, reason: split ? "not inside <split>/<label>/" : "not inside a label folder" });
      continue;
    }
    const name = (parts[parts.length - 1] as string).toLowerCase();
    if (!IMAGE_EXTENSIONS.some((ext) => name.endsWith(ext))) {
      entries.push({ kind: "ignored", key, reason: `not an image file (expected ${IMAGE_EXTENSIONS.join(", ")})` });
      continue;
    }
    const label = parts[labelIndex] as string;
    if (split) {
      const folder = (parts[0] as string).toLowerCase() as keyof typeof SPLIT_FOLDERS;
      entries.push({ kind: "image", key, label, split: SPLIT_FOLDERS[folder] });
    } else {
      entries.push({ kind: "image", key, label });
    }
  }
  return { layout: split ? "split" : "flat", entries };
}

function isHidden(part: string): boolean {
  return part.startsWith(".") || part === "__MACOSX" || part === "Thumbs.db";
}
