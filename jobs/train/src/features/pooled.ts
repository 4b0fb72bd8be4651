import type * as tf from "@tensorflow/tfjs";
import { DatasetError } from "#shared/errors.ts";
import { keys } from "#shared/keys.ts";
import { type NearDuplicate, separateNearDuplicates } from "../dataset/near-duplicates.ts";
import type { DatasetImage } from "../dataset/read.ts";
import type { RunPlan } from "../plan.ts";
import type { RunContext } from "../run.ts";
import { extractorFor, extractSplits, type Features } from "./extract.ts";
import { type EmbedFanOut, FanOutHandedOver, fanOutHook } from "./fan-out.ts";

/**
 * Stage 2: the frozen base's pooled features of every image (every augmented view of a training
 * image, view 0 of a held-out one), from the cache where they exist, computed and cached where not,
 * possibly by an array job (`fanOut`). Images that cannot be decoded are dropped here and reported.
 */
export interface PooledFeatures {
  features: Features;
  /** The images that have features, per split. */
  train: DatasetImage[];
  val: DatasetImage[];
  skipped: { key: string; reason: string }[];
  /** Held-out images left out of the evaluation: near-identical to a training image (dataset/near-duplicates.ts). */
  nearDuplicates: (NearDuplicate & { valKey: string; trainKey: string })[];
}

export async function pooledFeatures(ctx: RunContext, plan: RunPlan, baseModel: tf.LayersModel, fanOut?: EmbedFanOut): Promise<PooledFeatures> {
  const { dataset, base, options } = plan;
  const train = dataset.images.filter((i) => i.split === "train");
  const val = dataset.images.filter((i) => i.split === "val");
  const extractor = extractorFor(baseModel, plan.pooledSpec);
  const features = await ctx.stage(
    "features",
    () =>
      extractSplits(ctx.store, extractor, plan.pooledSpec, { train, heldOut: val }, (split, d, t) => ctx.log.progress(`features (${split})`, d, t), {
        beforeCompute:
          fanOut &&
          fanOutOnce(
            ctx,
            plan,
            fanOutHook(fanOut, { dataset: dataset.name, base: base.id, imageSize: options.imageSize, views: options.views, seed: options.seed }, ctx.log),
          ),
      }),
    (f) => ({ ...f.stats }),
  );
  // The cache is shared by every dataset on the same base and spec, and so is its list of undecodable
  // images: report only this dataset's, under this dataset's keys.
  const skipped = [...train, ...val].flatMap((i) => {
    const failure = features.failed.get(i.id);
    return failure ? [{ key: i.key, reason: failure.reason }] : [];
  });
  for (const s of skipped) ctx.log.warn(`skipped ${s.key}: ${s.reason}`);
  const usableTrain = train.filter((i) => features.byId.has(i.id));
  if (usableTrain.length === 0) throw new DatasetError(`Dataset ${dataset.name}: none of its training images could be decoded (see the skipped files above).`);
  const usableVal = val.filter((i) => features.byId.has(i.id));
  // A held-out image near-identical to a training image of its label would flatter the evaluation: it is left out.
  const { dropped: nearDuplicates, warnings } = separateNearDuplicates(usableTrain, usableVal, (id) => features.hashes.get(id));
  for (const w of warnings) ctx.log.warn(w);
  const unhashed = usableVal.filter((i) => !features.hashes.has(i.id)).length;
  if (unhashed > 0) ctx.log.info(`${unhashed} held-out image(s) were cached before input hashes were recorded: not checked for near-duplicates`);
  if (nearDuplicates.length > 0) {
    ctx.log.warn(
      `${nearDuplicates.length} held-out image(s) are near-identical to training images of their label and are left out of the evaluation (e.g. ${nearDuplicates[0]?.valKey} ≈ ${nearDuplicates[0]?.trainKey})`,
    );
  }
  const dropped = new Set(nearDuplicates.map((d) => d.val));
  return { features, train: usableTrain, val: usableVal.filter((i) => !dropped.has(i.id)), skipped, nearDuplicates };
}

/**
 * The fan-out, at most once per version: a run that hands its extraction over leaves a marker (its
 * continuation is on the way), and a duplicate trigger of the same version, which finds the lock free
 * once the first run has ended, ends too instead of submitting a second array job. The marker is kept
 * a day (a continuation that never came, e.g. failed children, does not block the next try for longer).
 */
export function fanOutOnce(ctx: Pick<RunContext, "store">, plan: Pick<RunPlan, "name" | "version">, hook: (todo: readonly unknown[]) => Promise<boolean>) {
  const key = keys.handOver(plan.name, plan.version);
  return async (todo: readonly unknown[]) => {
    const marker = await ctx.store.get(key);
    if (marker) {
      const earlier = JSON.parse(new TextDecoder().decode(marker)) as { at: string; continuationJobId: string; arrayJobId: string };
      if (Date.now() - Date.parse(earlier.at) < 24 * 60 * 60 * 1000) throw new FanOutHandedOver(earlier.arrayJobId, earlier.continuationJobId, 0);
    }
    try {
      return await hook(todo);
    } catch (e) {
      if (e instanceof FanOutHandedOver)
        await ctx.store.put(
          key,
          JSON.stringify({ at: new Date().toISOString(), arrayJobId: e.arrayJobId, continuationJobId: e.continuationJobId }),
          "application/json",
        );
      throw e;
    }
  };
}
