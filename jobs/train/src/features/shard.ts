import { sha256Hex } from "#shared/hash.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import type { TrainInput } from "../config.ts";
import type { DatasetImage } from "../dataset/read.ts";
import type { Logger } from "../log.ts";
import { initBackend } from "../model/backend.ts";
import { loadBase } from "../model/bases.ts";
import { planRun } from "../plan.ts";
import { runContext } from "../run.ts";
import { extractorFor, extractSplits } from "./extract.ts";

/**
 * One shard of the feature extraction, for AWS Batch array jobs on datasets too large for one
 * machine: child `shard` of `shards` embeds the images whose content id hashes to it and writes the
 * packs; `edgetune train` afterwards finds them all in the cache and only trains. Shards are disjoint
 * and cover the dataset, and a shard run twice does nothing the second time.
 */
export async function embedShard(store: ObjectStore, input: TrainInput, shard: number, shards: number, log: Logger) {
  if (!Number.isInteger(shards) || shards < 1 || !Number.isInteger(shard) || shard < 0 || shard >= shards) {
    throw new RangeError(`shard must be 0…${shards - 1} of ${shards}`);
  }
  await initBackend();
  const { dataset, base, options, pooledSpec } = await planRun(runContext(store, log), input);
  const mine: DatasetImage[] = [];
  for (const image of dataset.images) if (Number.parseInt((await sha256Hex(image.id)).slice(0, 8), 16) % shards === shard) mine.push(image);
  const model = await loadBase(store, base, options.imageSize);
  try {
    const extractor = extractorFor(model, pooledSpec);
    const features = await extractSplits(
      store,
      extractor,
      pooledSpec,
      { train: mine.filter((i) => i.split === "train"), heldOut: mine.filter((i) => i.split !== "train") },
      (split, d, t) => log.progress(`shard ${shard} (${split})`, d, t),
    );
    const stats = {
      shard,
      shards,
      images: mine.length,
      computed: features.stats.computed,
      cached: features.stats.cached,
      failed: features.stats.failed,
    };
    log.info("shard done", stats);
    return stats;
  } finally {
    model.dispose();
  }
}
