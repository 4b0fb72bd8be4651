import { nameSchema } from "#shared/contracts/common.ts";

/**
 * Failures outside the job's own code — an out-of-memory kill, an image that cannot be pulled, Spot
 * reclaims past the retries, a job cancelled while waiting for capacity — end a Batch job without the
 * job writing a word. AWS Batch tells EventBridge ("Batch Job State Change", FAILED); the stack's
 * handler (infra/functions/job-failed.ts) turns that event into a reason here and closes the job's runs
 * with it (`failJob`, job-failure.ts, as the local dispatcher does for a dead child), so `edgetune status`
 * and `push --wait` say what happened instead of "running" for hours, and its locks are freed.
 */

/** The fields of a "Batch Job State Change" event's detail (AWS: the JobDetail of DescribeJobs) read here. */
export interface BatchJobDetail {
  jobId: string;
  jobName?: string;
  jobQueue?: string;
  status: string;
  statusReason?: string;
  createdAt?: number;
  stoppedAt?: number;
  parameters?: Record<string, string>;
  retryStrategy?: { attempts?: number };
  attempts?: { statusReason?: string; container?: { exitCode?: number; reason?: string } }[];
  container?: { exitCode?: number; reason?: string };
}

export interface InfraFailure {
  dataset: string;
  jobId: string;
  reason: string;
}

/** The dataset a job trains: its `dataset` parameter, a name or a manifest key; undefined for "*" (a nightly sweep has no one record). */
export function datasetOfJob(parameters: Record<string, string> | undefined): string | undefined {
  const raw = parameters?.dataset ?? "";
  const name = /^datasets\/([^/]+)\/manifest\.json$/.exec(raw)?.[1] ?? raw;
  return nameSchema.safeParse(name).success ? name : undefined;
}

const SPOT_RECLAIM = /^Host EC2 \(instance [^)]*\) terminated|Your Spot Task was interrupted/i;

/** AWS's reason for a FAILED job, in words a user can act on, with AWS's own text after it. */
export function plainReason(detail: BatchJobDetail): string {
  const status = detail.statusReason ?? "";
  const attempts = detail.attempts ?? [];
  const last = attempts.at(-1);
  const container = { ...last?.container, ...detail.container };
  const containerReason = container.reason ?? "";
  const aws = [status, containerReason].filter(Boolean).join("; ");
  const said = (plain: string) => (aws ? `${plain} (AWS Batch: ${aws})` : plain);
  // jobStateTimeLimitActions (the queues cancel jobs stuck in RUNNABLE) set these reasons.
  if (status.startsWith("CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"))
    return said(
      "cancelled while waiting for capacity: no instance of the allowed types could be started within runnableTimeoutMinutes (a G-instance quota of 0, or no Spot or on-demand capacity in the region)",
    );
  if (status.startsWith("MISCONFIGURATION:COMPUTE_ENVIRONMENT_MAX_RESOURCE"))
    return said("cancelled while waiting: the job needs more vCPUs than its compute environment may ever start (raise maxVcpus or cpuMaxVcpus)");
  if (status.startsWith("MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT"))
    return said("cancelled while waiting: no allowed instance type has the vCPUs, memory or GPU the job asks for");
  if (/Job attempt duration exceeded timeout/i.test(status)) return said("timed out: the job ran longer than jobTimeoutHours");
  if (/OutOfMemoryError/i.test(containerReason) || container.exitCode === 137)
    return said(`out of memory (exit ${container.exitCode ?? 137}): the job needed more memory than it was given (jobMemoryGiB, cpuJobMemoryGiB)`);
  if (/CannotPullContainerError|CannotPullImage|pull image/i.test(aws))
    return said("image could not be pulled: the training image is missing from ECR or the host cannot reach it");
  if (attempts.length > 0 && attempts.every((a) => SPOT_RECLAIM.test(a.statusReason ?? "")))
    return said(`Spot capacity reclaimed, retries exhausted (${attempts.length} attempt${attempts.length === 1 ? "" : "s"})`);
  if (/Dependent Job failed/i.test(status))
    return said("an embedding array job this run handed its features to failed (its own failure is on the alerts topic)");
  if (attempts.length === 0) return said("cancelled before it started");
  if (container.exitCode !== undefined && container.exitCode !== 0)
    return said(`the job exited with code ${container.exitCode} without recording why (see its log in CloudWatch)`);
  return said("the job failed outside the training code");
}

/** The failure to record for a "Batch Job State Change" event, or undefined when there is none (not FAILED, no single dataset). */
export function failureOf(detail: BatchJobDetail): InfraFailure | undefined {
  if (detail.status !== "FAILED") return undefined;
  const dataset = datasetOfJob(detail.parameters);
  if (!dataset) return undefined;
  return { dataset, jobId: detail.jobId, reason: plainReason(detail) };
}
