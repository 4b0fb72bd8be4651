import { BatchClient, DescribeJobsCommand, SubmitJobCommand } from "@aws-sdk/client-batch";
import { EdgetuneError } from "#shared/errors.ts";
import type { Logger } from "../log.ts";

/**
 * Scale-out of feature extraction over AWS Batch. A training run (itself a Batch job) that finds more
 * images without cached features than one machine should embed submits the `Embed` job definition as
 * an array job — one child per shard, each running `edgetune embed --shard $AWS_BATCH_JOB_ARRAY_INDEX`
 * (see shard.ts) — and then finds those features in the cache. A child that fails costs only time:
 * the training run computes whatever is still missing itself.
 *
 * In AWS Batch the run does not wait on its GPU host while the children work: it hands over. It submits
 * the array job, then a continuation — the same Train job for the same dataset, `dependsOn` the array job
 * and with fan-out off — and ends (FanOutHandedOver); Batch starts the continuation when every child has
 * ended. The children end successfully even when they could not embed their shard (see the embed
 * command), so a failed child never fails the continuation.
 */
export class FanOutHandedOver extends EdgetuneError {
  readonly arrayJobId: string;
  readonly continuationJobId: string;
  constructor(arrayJobId: string, continuationJobId: string, shards: number) {
    super(
      "handed_over",
      `Features are being computed by ${shards} array children (job ${arrayJobId}); training continues in job ${continuationJobId} when they end.`,
    );
    this.arrayJobId = arrayJobId;
    this.continuationJobId = continuationJobId;
  }
}
export interface FanOutRequest {
  dataset: string;
  shards: number;
  /** The options that make the features' cache key: the children must compute exactly what the run reads. */
  base: string;
  imageSize: number;
  views: number;
  seed: number;
}

export interface EmbedFanOut {
  /** Above this many images to embed, a run fans out, one child per this many images. */
  readonly imagesPerShard: number;
  readonly maxShards: number;
  /** Runs the children and waits for them (the local stand-in). */
  run(request: FanOutRequest, log: Logger): Promise<{ succeeded: number; failed: number }>;
  /** Submits the children and a continuation of this run that waits for them, then throws FanOutHandedOver (AWS Batch). */
  handOver?(request: FanOutRequest, log: Logger): Promise<never>;
}

/** Children for `todo` images to embed: 0 means the run embeds them itself. */
export function shardsFor(todo: number, fanOut: Pick<EmbedFanOut, "imagesPerShard" | "maxShards">): number {
  if (todo <= fanOut.imagesPerShard) return 0;
  // Batch array jobs have 2…10 000 children.
  return Math.max(2, Math.min(fanOut.maxShards, 10_000, Math.ceil(todo / fanOut.imagesPerShard)));
}

/** A child's command line (after the CLI's program name); the child's index comes from its environment. */
export function embedCommand(r: FanOutRequest): string[] {
  return [
    "embed",
    "--dataset",
    r.dataset,
    "--shards",
    String(r.shards),
    "--base",
    r.base,
    "--image-size",
    String(r.imageSize),
    "--views",
    String(r.views),
    "--seed",
    String(r.seed),
    "--json",
  ];
}

export const FAN_OUT_DEFAULTS = { imagesPerShard: 20_000, maxShards: 20, pollSeconds: 30 };

/**
 * The fan-out of a run inside AWS Batch, configured by the stack through the environment; undefined
 * elsewhere (a local or CLI run embeds everything itself).
 */
export function batchFanOut(
  env: NodeJS.ProcessEnv = process.env,
  client: Pick<BatchClient, "send"> = new BatchClient({}),
  sleep: (ms: number) => Promise<void> = (ms) => new Promise((r) => setTimeout(r, ms)),
): EmbedFanOut | undefined {
  const { AWS_BATCH_JOB_ID: parent, EDGETUNE_EMBED_JOB_DEFINITION: jobDefinition, EDGETUNE_JOB_QUEUE: jobQueue } = env;
  // The children may run on another queue (CPU: embedding needs no GPU); the continuation runs on the job's own.
  const childQueue = env.EDGETUNE_EMBED_JOB_QUEUE ?? jobQueue;
  // A continuation (see handOver) computes what its children left itself: it never fans out again.
  if (!parent || !jobDefinition || !jobQueue || env.EDGETUNE_FAN_OUT === "off") return undefined;
  const submitChildren = async (r: FanOutRequest, log: Logger): Promise<string> => {
    const submitted = await client.send(
      new SubmitJobCommand({
        jobName: `edgetune-embed-${r.dataset}`.replaceAll(/[^A-Za-z0-9_-]/g, "-").slice(0, 128),
        jobQueue: childQueue,
        jobDefinition,
        arrayProperties: { size: r.shards },
        containerOverrides: { command: embedCommand(r), environment: [{ name: "EDGETUNE_FAN_OUT_PARENT", value: parent }] },
      }),
    );
    log.info("fan-out submitted", { jobId: submitted.jobId, shards: r.shards });
    return submitted.jobId as string;
  };
  const number = (v: string | undefined, fallback: number) => (v && Number.isInteger(Number(v)) && Number(v) > 0 ? Number(v) : fallback);
  const pollSeconds = number(env.EDGETUNE_FAN_OUT_POLL_SECONDS, FAN_OUT_DEFAULTS.pollSeconds);
  return {
    imagesPerShard: number(env.EDGETUNE_FAN_OUT_IMAGES_PER_SHARD, FAN_OUT_DEFAULTS.imagesPerShard),
    maxShards: number(env.EDGETUNE_FAN_OUT_MAX_SHARDS, FAN_OUT_DEFAULTS.maxShards),
    async handOver(r, log) {
      const arrayJobId = await submitChildren(r, log);
      // The continuation is this very job again (its definition, from Batch), for this dataset.
      const self = (await client.send(new DescribeJobsCommand({ jobs: [parent] }))).jobs?.[0];
      if (!self?.jobDefinition) throw new Error(`Batch does not describe this job (${parent})`);
      const continuation = await client.send(
        new SubmitJobCommand({
          jobName: `edgetune-${r.dataset}-after-embed`.replaceAll(/[^A-Za-z0-9_-]/g, "-").slice(0, 128),
          jobQueue,
          jobDefinition: self.jobDefinition,
          parameters: { ...self.parameters, dataset: r.dataset },
          dependsOn: [{ jobId: arrayJobId }],
          containerOverrides: { environment: [{ name: "EDGETUNE_FAN_OUT", value: "off" }] },
        }),
      );
      throw new FanOutHandedOver(arrayJobId, continuation.jobId as string, r.shards);
    },
    async run(r, log) {
      const jobId = await submitChildren(r, log);
      for (;;) {
        await sleep(pollSeconds * 1000);
        const job = (await client.send(new DescribeJobsCommand({ jobs: [jobId] }))).jobs?.[0];
        const summary = job?.arrayProperties?.statusSummary ?? {};
        log.progress("fan-out children", (summary.SUCCEEDED ?? 0) + (summary.FAILED ?? 0), r.shards);
        if (job?.status === "SUCCEEDED" || job?.status === "FAILED") {
          return { succeeded: summary.SUCCEEDED ?? 0, failed: summary.FAILED ?? (job.status === "FAILED" ? r.shards : 0) };
        }
        if (!job) throw new Error(`Batch no longer knows the fan-out job ${jobId}`);
      }
    },
  };
}

/**
 * The hook `extractSplits` calls with what is left to compute: above the threshold it runs the array
 * job and returns true (read the cache again); a failed fan-out is logged, never fatal.
 */
export function fanOutHook(fanOut: EmbedFanOut, request: Omit<FanOutRequest, "shards">, log: Logger): (todo: readonly unknown[]) => Promise<boolean> {
  return async (todo) => {
    const shards = shardsFor(todo.length, fanOut);
    if (shards === 0) return false;
    log.info(`${todo.length} images to embed: spreading them over ${shards} Batch array children`);
    try {
      if (fanOut.handOver) await fanOut.handOver({ ...request, shards }, log);
      const r = await fanOut.run({ ...request, shards }, log);
      if (r.failed > 0) log.warn(`${r.failed} of ${shards} embedding children failed; this run computes what they left`);
    } catch (e) {
      if (e instanceof FanOutHandedOver) throw e;
      log.warn(`the fan-out could not run (${e instanceof Error ? e.message : e}); this run computes what is missing`);
    }
    return true;
  };
}
