import { BatchClient, DescribeJobQueuesCommand, SubmitJobCommand } from "@aws-sdk/client-batch";
import { ServiceQuotasClient } from "@aws-sdk/client-service-quotas";
import { nameSchema } from "#shared/contracts/common.ts";
import { EdgetuneError, userMessage } from "#shared/errors.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import { listDatasets } from "./catalog/catalog.ts";
import type { TrainInput } from "./config.ts";
import { describeQuota, gpuJobFits, type QuotaClient, quotaRequest, readGpuQuotas } from "./gpu-quota.ts";
import type { Logger } from "./log.ts";
import { planRun, versionExists } from "./plan.ts";
import { applyRequests, modelsWithRequests } from "./requests/requests.ts";
import { runContext } from "./run.ts";
import { adoptQueued, StatusRecorder } from "./status.ts";
import { processTraffic } from "./traffic/traffic.ts";

/**
 * The dispatcher in AWS, for the nightly run and for every dataset upload: not one long job that trains
 * every dataset in turn (one slow or failing dataset would starve or fail the others, all inside one
 * timeout), but a small CPU job that plans and submits one training job per dataset whose data or
 * options changed since its last version — each with its own timeout, retries, status record and alert.
 * Unchanged datasets cost nothing (their version exists). A `head` run goes to the CPU queue (features on
 * ONNX Runtime, no GPU needed), a `finetune` run to the GPU queue.
 */
export interface NightlyResult {
  submitted: { dataset: string; jobId: string }[];
  unchanged: string[];
  failed: { dataset: string; reason: string }[];
}

export type SubmitTraining = (dataset: string, strategy: "head" | "finetune") => Promise<string>;

/** Plans `datasets` ("*": every complete one) and submits a training job for each that changed. */
export async function dispatchNightly(
  store: ObjectStore,
  input: Omit<TrainInput, "dataset">,
  submit: SubmitTraining,
  log: Logger,
  datasets: string[] | "*" = "*",
): Promise<NightlyResult> {
  const result: NightlyResult = { submitted: [], unchanged: [], failed: [] };
  // An upload (named datasets) always gets its training job: the job then closes the upload's queued
  // status record — "already trained" or the reason it cannot train — which `push --wait` is following.
  const uploads = datasets !== "*";
  const names = uploads ? datasets : (await listDatasets(store)).filter((d) => d.complete).map((d) => d.name);
  for (const name of names) await planAndSubmit(store, input, submit, log, name, uploads, result);
  if (uploads) return result;
  // Nightly: the traffic step comes after every training job is submitted, so nothing the edge's key
  // wrote under captures/ can starve tonight's training (and it reads within one budget, budget.ts).
  // Datasets that got reviewed captures just now are planned again, so they are trained on tonight.
  const traffic = await processTraffic(store, log).catch((e) => {
    log.warn(`traffic not processed: ${userMessage(e)}`);
    return [];
  });
  const grown = new Set(traffic.flatMap((t) => t.applied?.accepted.map((a) => a.key.split("/")[1] as string) ?? []));
  for (const name of [...grown].filter((d) => !result.submitted.some((s) => s.dataset === d))) {
    result.unchanged = result.unchanged.filter((d) => d !== name);
    await planAndSubmit(store, input, submit, log, name, false, result);
  }
  await sweepRequests(store, input, submit, log).catch((e) => log.warn(`console requests not swept: ${userMessage(e)}`));
  return result;
}

/** Console requests whose trigger was lost (requests/requests.ts): answered tonight, a "train now" submitted as an upload's run. */
async function sweepRequests(store: ObjectStore, input: Omit<TrainInput, "dataset">, submit: SubmitTraining, log: Logger): Promise<void> {
  const train = async (dataset: string) => {
    const r: NightlyResult = { submitted: [], unchanged: [], failed: [] };
    await planAndSubmit(store, input, submit, log, dataset, true, r);
    if (r.failed[0]) throw new EdgetuneError("submit_failed", r.failed[0].reason);
    return `A training run of dataset ${dataset} is submitted (job ${r.submitted[0]?.jobId}); follow it with edgetune status ${dataset}.`;
  };
  for (const model of await modelsWithRequests(store)) await applyRequests(store, model, { log, train });
}

/** Plans one dataset and submits its training job when it changed (an upload's always), recording the outcome in `result`. */
async function planAndSubmit(
  store: ObjectStore,
  input: Omit<TrainInput, "dataset">,
  submit: SubmitTraining,
  log: Logger,
  name: string,
  upload: boolean,
  result: NightlyResult,
): Promise<void> {
  // Before anything is submitted or recorded: an upload's name comes from an S3 event, and a name no dataset
  // can have would still get a training job (failing at once) and a status record under it.
  const valid = nameSchema.safeParse(name);
  if (!valid.success) {
    const reason = `"${name.slice(0, 200)}" is not a dataset name (${valid.error.issues[0]?.message}): nothing submitted.`;
    log.warn(reason);
    result.failed.push({ dataset: name, reason });
    return;
  }
  let strategy: "head" | "finetune" = "head";
  try {
    const plan = await planRun(runContext(store, log), { ...input, dataset: name });
    strategy = plan.options.strategy;
    if (!upload && (await versionExists(runContext(store, log), plan))) {
      result.unchanged.push(name);
      return;
    }
  } catch (e) {
    // Nightly: a dataset that cannot even be planned (no images, bad manifest) is reported; the others
    // go on. An upload: its job (on the CPU queue) records the reason where the uploader looks.
    log.warn(`${name}: ${userMessage(e)}`);
    if (!upload) {
      result.failed.push({ dataset: name, reason: userMessage(e) });
      return;
    }
  }
  try {
    result.submitted.push({ dataset: name, jobId: await submit(name, strategy) });
    log.info(`submitted the training of ${name}`, { strategy });
  } catch (e) {
    result.failed.push({ dataset: name, reason: userMessage(e) });
    log.warn(`${name}: could not submit its training (${userMessage(e)})`);
    // No job will take the upload's queued record over: close it here, so `push --wait` ends at once
    // with the reason (no GPU path, no G quota) instead of polling for hours. The dispatcher's own job
    // id goes into the record, so the failure handler, seeing this job fail, leaves the record as it is.
    if (upload) {
      const record = new StatusRecorder(store, name, "failed", await adoptQueued(store, name));
      await record.update({ reason: userMessage(e) }, true);
    }
  }
}

/** A fine-tuning run that cannot run in this account: no GPU path deployed, or a G-instance quota too small for its job. */
export class FineTuningUnavailable extends EdgetuneError {}

/**
 * Submits training jobs to the stack's queues, when this process is the dispatcher in AWS Batch:
 * `head` runs to the CPU queue where the stack has one, `finetune` runs to the GPU queue — after checking
 * that the GPU stack is deployed (its queue, named by the core, exists and is enabled) and that the job's
 * vCPUs fit the account's G-instance quota where it can be read. Either missing fails the run at once with
 * the reason, instead of a job that waits in RUNNABLE until it is cancelled.
 */
export function batchSubmitter(
  env: NodeJS.ProcessEnv = process.env,
  client: Pick<BatchClient, "send"> = new BatchClient({}),
  quotas: QuotaClient = new ServiceQuotasClient({}),
): SubmitTraining | undefined {
  const { EDGETUNE_JOB_QUEUE: gpuQueue, EDGETUNE_TRAIN_JOB_DEFINITION: gpuDefinition } = env;
  if (!env.AWS_BATCH_JOB_ID || !gpuQueue || !gpuDefinition) return undefined;
  const { EDGETUNE_CPU_JOB_QUEUE: cpuQueue, EDGETUNE_CPU_TRAIN_JOB_DEFINITION: cpuDefinition } = env;
  const gpuVcpus = Number(env.EDGETUNE_GPU_JOB_VCPUS) || 0;
  const region = env.AWS_REGION ?? "this region";
  const checkGpuPath = async () => {
    const queue = (await client.send(new DescribeJobQueuesCommand({ jobQueues: [gpuQueue] }))).jobQueues?.[0];
    if (queue?.state !== "ENABLED" || !["VALID", "UPDATING"].includes(queue.status ?? ""))
      throw new FineTuningUnavailable(
        "no_gpu_path",
        `Fine-tuning needs the GPU stack, which is not deployed here (job queue ${gpuQueue} ${queue ? `is ${queue.state}/${queue.status}` : "does not exist"}): run \`npm run deploy\` (its last step deploys it, see infra/README.md), or train this dataset with --strategy head.`,
      );
    if (gpuVcpus === 0) return;
    const q = await readGpuQuotas(quotas, env.EDGETUNE_GPU_SPOT !== "false");
    // Unknown (neither the account's quota nor AWS's default readable): submitted, and a job that finds no
    // capacity is cancelled after runnableTimeoutMinutes with that reason in its record.
    if (gpuJobFits(q, gpuVcpus) === false)
      throw new FineTuningUnavailable(
        "gpu_quota",
        `A fine-tuning job needs ${gpuVcpus} vCPU of G instances, but ${describeQuota("spot", q.spot)} and ${describeQuota("onDemand", q.onDemand)}: ${quotaRequest(gpuVcpus, region)}, then push again; or train this dataset with --strategy head.`,
      );
  };
  return async (dataset, strategy) => {
    const cpu = strategy === "head" && cpuQueue && cpuDefinition;
    if (!cpu) await checkGpuPath();
    const r = await client.send(
      new SubmitJobCommand({
        jobName: `edgetune-${strategy}-${dataset}`.replaceAll(/[^A-Za-z0-9_-]/g, "-").slice(0, 128),
        jobQueue: cpu ? cpuQueue : gpuQueue,
        jobDefinition: cpu ? cpuDefinition : gpuDefinition,
        parameters: { dataset },
      }),
    );
    return r.jobId as string;
  };
}
