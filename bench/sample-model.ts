import type { ObjectStore } from "#shared/s3/store.ts";
import type { TrainInput } from "../jobs/train/src/config.ts";
import { sampleDataset } from "../jobs/train/src/dataset/sample.ts";
import { createLogger } from "../jobs/train/src/log.ts";
import { train } from "../jobs/train/src/train.ts";

/**
 * The edge benchmarks' model: the Twemoji sample (12 images per label) pushed as dataset "bench" and
 * trained quickly (one view, 5 epochs) on `base` at `imageSize`, promoted; `model` names it (default: the dataset's name).
 */
export async function trainSampleModel(store: ObjectStore, options: { base: string; imageSize: TrainInput["imageSize"]; model?: string }): Promise<void> {
  const log = createLogger({ json: true, quiet: true, stream: { write: () => true } as unknown as NodeJS.WriteStream });
  for (const i of await sampleDataset({ perLabel: 12, size: 128 })) await store.put(`datasets/bench/${i.file}`, i.bytes);
  await store.put("datasets/bench/manifest.json", "{}");
  await train(store, { dataset: "bench", ...options, views: 1, head: { epochs: 5 }, promote: "always" }, log);
}
