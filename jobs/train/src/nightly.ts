import { BatchClient, SubmitJobCommand } from "@aws-sdk/client-batch";
import { userMessage } from "../../../shared/errors.ts";
import type { ObjectStore } from "../../../shared/s3/store.ts";
import { listDatasets } from "./catalog/catalog.ts";
import type { TrainInput } from "./config.ts";
import type { Logger } from "./log.ts";
import { planRun, versionExists } from "./plan.ts";
import { runContext } from "./run.ts";

/**
 * The nightly run in AWS: not one long job that trains every dataset in turn (one slow or failing
 * dataset would starve or fail the others, all inside one timeout), but a small CPU job that submits
 * one training job per dataset whose data or options changed since its last version — each with its own
 * timeout, retries, status record and alert. Unchanged datasets cost nothing (their version exists).
 */
export interface NightlyResult {
  submitted: { dataset: string; jobId: string }[];
  unchanged: string[];
  failed: { dataset: string; reason: string }[];
}

export type SubmitTraining = (dataset: string) => Promise<string>;

export async function dispatchNightly(store: ObjectStore, input: Omit<TrainInput, "dataset">, submit: SubmitTraining, log: Logger): Promise<NightlyResult> {
  const result: NightlyResult = { submitted: [], unchanged: [], failed: [] };
  for (const { name, complete } of await listDatasets(store)) {
    if (!complete) continue;
    try {
      const plan = await planRun(runContext(store, log), { ...input, dataset: name });
      if (await versionExists(runContext(store, log), plan)) {
        result.unchanged.push(name);
        continue;
      }
      result.submitted.push({ dataset: name, jobId: await submit(name) });
      log.info(`submitted the training of ${name}`);
    } catch (e) {
      // A dataset that cannot even be planned (no images, bad manifest) is reported; the others go on.
      result.failed.push({ dataset: name, reason: userMessage(e) });
      log.warn(`${name}: ${userMessage(e)}`);
    }
  }
  return result;
}

/** Submits training jobs to the stack's queue, when this process is the nightly dispatcher in AWS Batch. */
export function batchSubmitter(env: NodeJS.ProcessEnv = process.env, client: Pick<BatchClient, "send"> = new BatchClient({})): SubmitTraining | undefined {
  const { EDGETUNE_JOB_QUEUE: jobQueue, EDGETUNE_TRAIN_JOB_DEFINITION: jobDefinition } = env;
  if (!env.AWS_BATCH_JOB_ID || !jobQueue || !jobDefinition) return undefined;
  return async (dataset) => {
    const r = await client.send(
      new SubmitJobCommand({
        jobName: `edgetune-nightly-${dataset}`.replaceAll(/[^A-Za-z0-9_-]/g, "-").slice(0, 128),
        jobQueue,
        jobDefinition,
        parameters: { dataset },
      }),
    );
    return r.jobId as string;
  };
}
