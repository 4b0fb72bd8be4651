import { type BatchJobDetail, failureOf, recordInfraFailure } from "../../jobs/train/src/batch-failure.ts";
import { S3ObjectStore } from "../../shared/s3/client.ts";
import { s3ConfigFromEnv } from "../../shared/s3/config.ts";

/**
 * The Lambda behind the "Batch Job State Change → FAILED" rule (infra/constructs/failure-records.ts):
 * writes the run's status record from AWS's reason. Bundled from the repository by CDK (esbuild).
 */
export async function handler(event: { detail: BatchJobDetail }): Promise<{ recorded?: string }> {
  const failure = failureOf(event.detail);
  if (!failure) return {};
  const store = new S3ObjectStore(s3ConfigFromEnv(process.env));
  const { runId, action } = await recordInfraFailure(store, failure);
  // One line per event in the function's log: what was written where, and why.
  console.log(JSON.stringify({ jobId: failure.jobId, dataset: failure.dataset, runId, action, reason: failure.reason }));
  return { recorded: `${failure.dataset}/${runId}: ${action}` };
}
