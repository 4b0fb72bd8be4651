import * as path from "node:path";
import { Duration } from "aws-cdk-lib";
import * as events from "aws-cdk-lib/aws-events";
import * as targets from "aws-cdk-lib/aws-events-targets";
import * as iam from "aws-cdk-lib/aws-iam";
import * as lambda from "aws-cdk-lib/aws-lambda";
import * as destinations from "aws-cdk-lib/aws-lambda-destinations";
import * as nodejs from "aws-cdk-lib/aws-lambda-nodejs";
import * as logs from "aws-cdk-lib/aws-logs";
import type * as s3 from "aws-cdk-lib/aws-s3";
import type * as sqs from "aws-cdk-lib/aws-sqs";
import { Construct } from "constructs";

/**
 * Infrastructure failures reach the run's status record: a rule on "Batch Job State Change" (FAILED) for
 * the jobs of our queues — which includes a job the queue cancelled after waiting too long in RUNNABLE
 * (jobStateTimeLimitActions) — invokes a small Lambda that closes the job's runs in `status/<dataset>/…`
 * with AWS's reason in words (jobs/train/src/batch-failure.ts) and frees the model locks it held
 * (jobs/train/src/job-failure.ts, which the local dispatcher uses for a dead child too).
 *
 * A Lambda rather than a Batch job running a CLI subcommand: the failures it reports include "the image
 * could not be pulled", "no capacity" and Spot reclaims — a handler on the same queue and image would
 * share them and stay silent exactly when it matters; a Lambda starts in about a second, costs nothing
 * at rest, and needs no queue, image or network of ours. It is bundled from the repository by CDK's
 * esbuild, with the same status code the CLI uses. Delivery is retried; what cannot be delivered lands in
 * the triggers' dead-letter queue, which raises the alarm. So does an event the handler itself failed on
 * (EventBridge invokes it asynchronously: Lambda retries twice, then would drop it; the on-failure
 * destination keeps it), and its errors have an alarm of their own (alerts.ts).
 */
export class FailureRecords extends Construct {
  readonly rule: events.Rule;
  readonly handler: nodejs.NodejsFunction;

  constructor(scope: Construct, id: string, props: { bucket: s3.IBucket; queueArns: string[]; deadLetters: sqs.IQueue; logRetention: logs.RetentionDays }) {
    super(scope, id);
    const repoRoot = path.join(import.meta.dirname, "..", "..");
    this.handler = new nodejs.NodejsFunction(this, "Handler", {
      description: "edgetune: a failed Batch job's reason into its run's status record",
      entry: path.join(repoRoot, "infra/functions/job-failed.ts"),
      handler: "handler",
      runtime: lambda.Runtime.NODEJS_24_X,
      architecture: lambda.Architecture.ARM_64,
      memorySize: 256,
      timeout: Duration.seconds(30),
      environment: { EDGETUNE_BUCKET: props.bucket.bucketName },
      logGroup: new logs.LogGroup(this, "Logs", { retention: props.logRetention }),
      depsLockFilePath: path.join(repoRoot, "package-lock.json"),
      projectRoot: repoRoot,
      // The AWS SDK bundled too (not the runtime's copy): the same client version the tests ran.
      bundling: { externalModules: [], minify: true, sourceMap: false, target: "node24", format: nodejs.OutputFormat.CJS },
      retryAttempts: 2,
      onFailure: new destinations.SqsDestination(props.deadLetters),
    });
    // Only the status records (read, write) and the models' locks (read, delete the dead job's:
    // jobs/train/src/job-failure.ts); nothing else in the bucket but its listing.
    this.handler.addToRolePolicy(new iam.PolicyStatement({ actions: ["s3:GetObject", "s3:PutObject"], resources: [props.bucket.arnForObjects("status/*")] }));
    this.handler.addToRolePolicy(new iam.PolicyStatement({ actions: ["s3:GetObject", "s3:DeleteObject"], resources: [props.bucket.arnForObjects("locks/*")] }));
    // ListBucket without an s3:prefix condition, as the job role has it: S3 answers a GET or HEAD of a
    // missing key with 404 only to a caller that may list the bucket, else 403 — and the claim of a queued
    // record (status.ts, putIfAbsent) checks for a missing key. A GET carries no s3:prefix, so a prefix
    // condition would turn that 404 into a 403 and leave the record "queued".
    this.handler.addToRolePolicy(new iam.PolicyStatement({ actions: ["s3:ListBucket"], resources: [props.bucket.bucketArn] }));
    this.rule = new events.Rule(this, "JobFailed", {
      description: "A failed edgetune Batch job: record the reason in its run's status",
      eventPattern: { source: ["aws.batch"], detailType: ["Batch Job State Change"], detail: { status: ["FAILED"], jobQueue: props.queueArns } },
      targets: [new targets.LambdaFunction(this.handler, { retryAttempts: 3, deadLetterQueue: props.deadLetters })],
    });
  }
}
