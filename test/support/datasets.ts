import type { ObjectStore } from "#shared/s3/store.ts";
import { sampleDataset } from "../../jobs/train/src/dataset/sample.ts";

/** Uploads `perLabel` sample (Twemoji) images per label as dataset `name`, manifest last. */
export async function uploadSample(
  store: ObjectStore,
  name: string,
  options: { perLabel: number; offset?: number; size?: number; manifest?: object; labels?: string[] },
) {
  const images = (await sampleDataset({ perLabel: options.perLabel, offset: options.offset, size: options.size ?? 96 })).filter(
    (i) => !options.labels || options.labels.includes(i.label),
  );
  await Promise.all(images.map((i) => store.put(`datasets/${name}/${i.file}`, i.bytes)));
  await store.put(`datasets/${name}/manifest.json`, JSON.stringify(options.manifest ?? {}));
  return images;
}
