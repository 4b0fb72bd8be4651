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
/**
 * Job-only records inside a dataset (`datasets/<name>/.edgetune/…`): which captures were applied to it,
 * so a replayed decision adds nothing. Not part of the data: skipped by the listing, kept by a re-push.
 */
export const JOB_FOLDER = ".edgetune/";

/** A label as stored (model metadata, older datasets): what readers accept, so existing models keep loading. */
export const labelSchema = z
  .string()
  .min(1)
  .max(100)
  .refine((s) => !s.startsWith(".") && !s.includes("/"), "must be a plain folder name");

/** Letters (not format characters, so \p{Cf} misses them) that render as empty space: Hangul fillers, the braille blank. */
const BLANK_LETTERS = /[\u115f\u1160\u3164\uffa0\u2800]/u;

/** What makes a new label unsafe to show or to tell apart; null when it is fine. */
export function labelProblem(label: string): string | null {
  // Cc: C0/C1 controls (escape sequences); Cf: format characters (zero-width, bidi overrides, soft hyphen).
  if (/\p{Cc}/u.test(label)) return "has a control character";
  if (/\p{Cf}/u.test(label)) return "has an invisible format character (zero-width or direction mark)";
  if (BLANK_LETTERS.test(label)) return "has a blank letter (a Hangul or braille blank, shown as nothing)";
  if (label.trim() !== label) return "starts or ends with a space";
  if (label.normalize("NFC") !== label) return `is not in Unicode normal form NFC (rename it "${label.normalize("NFC")}")`;
  return null;
}

/**
 * A label a person or a dataset introduces now (dataset folders, `review --as`, decisions): a stored label
 * plus no controls, no invisible characters, NFC only. Look-alikes of another label are `lookAlikes`.
 */
export const newLabelSchema = labelSchema.superRefine((s, ctx) => {
  const problem = labelProblem(s);
  if (problem) ctx.addIssue({ code: "custom", message: problem });
});

/**
 * Latin look-alikes among Cyrillic and Greek letters, lower case (after NFKC and case folding). Only the
 * common ones, not Unicode's whole confusables table: enough that "cat" and "сat" (Cyrillic с) collide.
 */
const CONFUSABLES: Record<string, string> = {
  а: "a",
  в: "b",
  е: "e",
  ё: "e",
  к: "k",
  м: "m",
  н: "h",
  о: "o",
  р: "p",
  с: "c",
  т: "t",
  у: "y",
  х: "x",
  і: "i",
  ј: "j",
  ѕ: "s",
  ԁ: "d",
  ԛ: "q",
  ԝ: "w",
  ӏ: "l",
  α: "a",
  β: "b",
  ε: "e",
  η: "n",
  ι: "i",
  κ: "k",
  ν: "v",
  ο: "o",
  ρ: "p",
  τ: "t",
  υ: "u",
  χ: "x",
  γ: "y",
  ω: "w",
  ς: "c",
};

/** The form two labels share when a reader could not tell them apart: NFKC, case-folded, no invisible characters or blank letters, no spaces around it, look-alikes mapped. */
export function labelSkeleton(label: string): string {
  const folded = label
    .normalize("NFKC")
    .toLowerCase()
    .replace(/[\p{Cf}\p{Cc}]/gu, "")
    .replace(new RegExp(BLANK_LETTERS.source, "gu"), "")
    .trim();
  return [...folded].map((c) => CONFUSABLES[c] ?? c).join("");
}

/** Pairs of distinct labels that look alike (same skeleton), e.g. ["food", "fооd"]. */
export function lookAlikes(labels: readonly string[]): [string, string][] {
  const seen = new Map<string, string>();
  const pairs: [string, string][] = [];
  for (const l of labels) {
    const k = labelSkeleton(l);
    const other = seen.get(k);
    if (other !== undefined && other !== l) pairs.push([other, l]);
    else seen.set(k, l);
  }
  return pairs;
}

export const manifestSchema = z.object({
  /** Contract version of this file. */
  schemaVersion: z.literal(1).default(1),
  /** Base model id (see `bases/`), defaults to `auto` (jobs/train/src/model/bases.ts). */
  base: z.string().min(1).optional(),
  strategy: strategySchema.optional(),
  imageSize: imageSizeSchema.optional(),
  epochs: z.number().int().min(1).max(500).optional(),
  /**
   * A label folder of negative examples ("none of these", e.g. `_none`): trained as a class, answered as
   * no label. Images that belong to none of the other labels, ideally like what clients will send.
   */
  noneLabel: labelSchema.optional(),
  /**
   * A folder of images that are none of the labels and are never trained on (e.g. `_ood`): the training
   * report measures on them how often the version gives no label and how well its rejection score tells
   * them from the held-out images. Unlike `noneLabel`, it teaches the model nothing.
   */
  oodFolder: labelSchema.optional(),
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
    if (key === MANIFEST_FILE || key.endsWith("/") || key.startsWith(JOB_FOLDER)) continue;
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
