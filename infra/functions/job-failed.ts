import { S3ObjectStore } from "#shared/s3/client.ts";
import { s3ConfigFromEnv } from "#shared/s3/config.ts";
import { type BatchJobDetail, failureOf } from "../../jobs/train/src/batch-failure.ts";
import { failJob } from "../../jobs/train/src/job-failure.ts";

/**
 * The Lambda behind the "Batch Job State Change → FAILED" rule (infra/constructs/failure-records.ts):
 * closes the failed job's runs with AWS's reason in words and frees the model locks it held. Bundled
 * from the repository by CDK (esbuild).
 */
export async function handler(event: { detail: BatchJobDetail }): Promise<{ failed: string[]; freedLocks: string[] }> {
  const failure = failureOf(event.detail);
  if (!failure) return { failed: [], freedLocks: [] };
  const store = new S3ObjectStore(s3ConfigFromEnv(process.env));
  const { runs, freedLocks } = await failJob(store, { jobId: failure.jobId, dataset: failure.dataset }, failure.reason);
  const failed = runs.map((r) => `${r.dataset}/${r.runId}`);
  // One line per event in the function's log: what was closed, and why (none: the job had closed its run itself).
  console.log(JSON.stringify({ jobId: failure.jobId, dataset: failure.dataset, failed, freedLocks, reason: failure.reason }));
  return { failed, freedLocks };
}
