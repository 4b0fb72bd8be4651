import { classifyDatasetKeys, type DatasetManifest, labelProblem, labelSchema, lookAlikes, manifestSchema, type Split } from "#shared/contracts/dataset.ts";
import { parseContractJson } from "#shared/contracts/parse.ts";
import { DatasetError, NotFoundError } from "#shared/errors.ts";
import { sha256Hex } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import type { ObjectStore } from "#shared/s3/store.ts";

/**
 * Reading a dataset's listing from S3 and turning it into deterministic train/val/test splits.
 * Only the listing is read here (keys, ETags, sizes): images are fetched later, and only those whose
 * embeddings are not cached yet. An image's identity is its ETag and size — with SSE-S3 the ETag is
 * the MD5 of the content — so a renamed or re-uploaded identical file is recognised as the same image.
 */
export interface DatasetImage {
  key: string;
  /** Content identity: `<etag>-<size>`. */
  id: string;
  label: string;
  split: Split;
}

export interface Dataset {
  name: string;
  manifest: DatasetManifest;
  layout: "flat" | "split";
  labels: string[];
  images: DatasetImage[];
  /** The manifest's `oodFolder`: images that are none of the labels, for evaluation only (never trained on). */
  ood: DatasetImage[];
  ignored: { key: string; reason: string }[];
  /** sha256 of the listing and manifest: same fingerprint, same training data. */
  fingerprint: string;
  warnings: string[];
}

export const MIN_IMAGES_PER_LABEL = 5;
export const DEFAULT_VAL_FRACTION = 0.2;

export async function readDataset(store: ObjectStore, name: string, options: { seed: number; valFraction?: number }): Promise<Dataset> {
  const prefix = keys.dataset(name);
  const manifestBytes = await store.get(keys.manifest(name));
  if (!manifestBytes) throw new NotFoundError(`Dataset ${name} has no manifest.json yet (upload the images, then write ${keys.manifest(name)} last).`);
  const manifest = parseContractJson(manifestSchema, new TextDecoder().decode(manifestBytes), keys.manifest(name));

  const listed: { key: string; etag: string; size: number }[] = [];
  for await (const o of store.list(prefix)) listed.push({ ...o, key: o.key.slice(prefix.length) });
  const byKey = new Map(listed.map((o) => [o.key, o]));
  const { layout, entries } = classifyDatasetKeys(listed.map((o) => o.key));

  const ignoredLabels = new Set(manifest.ignoreLabels);
  const ignored: { key: string; reason: string }[] = [];
  const raw: { key: string; id: string; label: string; split?: Split }[] = [];
  const ood: DatasetImage[] = [];
  for (const e of entries) {
    if (e.kind === "ignored") {
      ignored.push({ key: prefix + e.key, reason: e.reason });
      continue;
    }
    const o = byKey.get(e.key) as { etag: string; size: number };
    if (o.size === 0) {
      ignored.push({ key: prefix + e.key, reason: "empty file" });
      continue;
    }
    if (ignoredLabels.has(e.label)) continue;
    if (e.label === manifest.oodFolder) {
      ood.push({ key: prefix + e.key, id: `${o.etag.replaceAll('"', "")}-${o.size}`, label: e.label, split: e.split ?? "val" });
      continue;
    }
    raw.push({ key: prefix + e.key, id: `${o.etag.replaceAll('"', "")}-${o.size}`, label: e.label, split: e.split });
  }
  if (manifest.imageCount !== undefined && raw.length + ignored.length < manifest.imageCount) {
    throw new DatasetError(
      `Dataset ${name}: the manifest announces ${manifest.imageCount} images but only ${raw.length + ignored.length} files are there. The upload is incomplete; finish it and write the manifest again.`,
    );
  }

  const labels = [...new Set(raw.map((r) => r.label))].sort();
  const images = await assignSplits(raw, options.seed, options.valFraction ?? DEFAULT_VAL_FRACTION);
  if (manifest.oodFolder !== undefined && manifest.oodFolder === manifest.noneLabel)
    throw new DatasetError(
      `Dataset ${name}: the manifest names "${manifest.oodFolder}" both as the none-of-these folder (trained on) and as the out-of-distribution folder (never trained on); use two folders.`,
    );
  const warnings = checkTrainable(name, labels, images);
  if (manifest.oodFolder !== undefined && ood.length === 0)
    warnings.push(
      `The manifest names "${manifest.oodFolder}" as the out-of-distribution folder, but it holds no images: the report has no out-of-distribution evaluation.`,
    );
  const sorted = (list: DatasetImage[]) => list.map((i) => [i.key, i.id, i.label, i.split]).sort((a, b) => (a[0] as string).localeCompare(b[0] as string));
  // The out-of-distribution images change the report, so the version; listed only when there are some,
  // so every dataset without them keeps its fingerprint (and its trained versions).
  const fingerprint = await sha256Hex(JSON.stringify({ manifest, images: sorted(images), ...(ood.length > 0 ? { ood: sorted(ood) } : {}) }));
  return { name, manifest, layout, labels, images, ood, ignored, fingerprint, warnings };
}

/**
 * Stratified, seeded split. Images with a split folder keep it; the rest are ordered per label by
 * sha256(seed, content id) and the first `valFraction` go to val. The same image lands in the same
 * split on every run and on every machine, and adding images never moves an existing one to the
 * other side (its rank only shifts if the fraction boundary moves past it).
 */
export async function assignSplits(
  images: { key: string; id: string; label: string; split?: Split }[],
  seed: number,
  valFraction: number,
): Promise<DatasetImage[]> {
  const hasVal = images.some((i) => i.split === "val");
  const out: DatasetImage[] = [];
  const pending = new Map<string, { image: (typeof images)[number]; rank: string }[]>();
  for (const image of images) {
    if (image.split === "val" || image.split === "test" || (image.split === "train" && hasVal)) {
      out.push({ ...image, split: image.split });
      continue;
    }
    const rank = await sha256Hex(`${seed}:${image.id}:${image.key}`);
    const list = pending.get(image.label) ?? [];
    list.push({ image, rank });
    pending.set(image.label, list);
  }
  for (const list of pending.values()) {
    list.sort((a, b) => (a.rank < b.rank ? -1 : a.rank > b.rank ? 1 : 0));
    const nVal = list.length >= 2 ? Math.max(1, Math.round(list.length * valFraction)) : 0;
    list.forEach(({ image }, i) => {
      out.push({ key: image.key, id: image.id, label: image.label, split: i < nVal ? "val" : "train" });
    });
  }
  return out.sort((a, b) => a.key.localeCompare(b.key));
}

/** The rules a dataset must meet to be trained; throws a DatasetError saying what to fix, returns warnings. Also run by `push` before uploading. */
export function checkTrainable(name: string, labels: string[], images: DatasetImage[]): string[] {
  if (images.length === 0) throw new DatasetError(`Dataset ${name} has no images. Put them in one folder per label: datasets/${name}/<label>/<image>.jpg`);
  // Checked here, before any image is fetched: a label is written into the model's metadata, whose
  // contract would refuse it only after the whole training.
  const invalid = labels.find((l) => !labelSchema.safeParse(l).success);
  if (invalid !== undefined) {
    const folder =
      invalid === ""
        ? 'an empty folder name (a key with "//")'
        : `"${invalid.length > 40 ? `${invalid.slice(0, 40)}…` : invalid}" (${invalid.length} characters)`;
    throw new DatasetError(`Dataset ${name}: label folder ${folder} is not a valid label: 1–100 characters, not starting with "."; rename the folder.`);
  }
  // Labels reach terminals, the console and clients: none may hide characters or pass for another.
  for (const l of labels) {
    const problem = labelProblem(l);
    if (problem) throw new DatasetError(`Dataset ${name}: label folder "${l}" ${problem}; rename the folder.`);
  }
  const [same] = lookAlikes(labels);
  if (same) {
    throw new DatasetError(
      `Dataset ${name}: label folders "${same[0]}" and "${same[1]}" look alike (they differ only in case, width or look-alike letters); merge or rename one.`,
    );
  }
  if (labels.length < 2) {
    throw new DatasetError(`Dataset ${name} has ${labels.length} label (${labels.join(", ")}); a classifier needs at least 2 label folders.`);
  }
  const counts = new Map<string, { train: number; val: number }>();
  for (const i of images) {
    const c = counts.get(i.label) ?? { train: 0, val: 0 };
    if (i.split === "train") c.train++;
    if (i.split === "val") c.val++;
    counts.set(i.label, c);
  }
  const tooFew = labels.filter((l) => (counts.get(l)?.train ?? 0) + (counts.get(l)?.val ?? 0) < MIN_IMAGES_PER_LABEL);
  if (tooFew.length > 0) {
    throw new DatasetError(
      `Dataset ${name}: ${tooFew.map((l) => `"${l}" has ${(counts.get(l)?.train ?? 0) + (counts.get(l)?.val ?? 0)}`).join(", ")} image(s); every label needs at least ${MIN_IMAGES_PER_LABEL}. Add images or list the label in the manifest's ignoreLabels.`,
    );
  }
  const noTrain = labels.filter((l) => (counts.get(l)?.train ?? 0) === 0);
  if (noTrain.length > 0) throw new DatasetError(`Dataset ${name}: label(s) ${noTrain.join(", ")} have no training images.`);
  const warnings: string[] = [];
  const sizes = labels.map((l) => counts.get(l)?.train ?? 0);
  const ratio = Math.max(...sizes) / Math.min(...sizes);
  if (ratio > 5) warnings.push(`Labels are lopsided (largest/smallest = ${ratio.toFixed(1)}); classes are weighted in the loss to compensate.`);
  if (!images.some((i) => i.split === "val")) warnings.push("No validation images: metrics are not meaningful and promotion compares nothing.");
  return warnings;
}
