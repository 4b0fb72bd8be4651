import { Duration, TimeZone } from "aws-cdk-lib";
import type * as batch from "aws-cdk-lib/aws-batch";
import * as events from "aws-cdk-lib/aws-events";
import * as targets from "aws-cdk-lib/aws-events-targets";
import * as iam from "aws-cdk-lib/aws-iam";
import type * as s3 from "aws-cdk-lib/aws-s3";
import * as scheduler from "aws-cdk-lib/aws-scheduler";
import * as schedulerTargets from "aws-cdk-lib/aws-scheduler-targets";
import * as sqs from "aws-cdk-lib/aws-sqs";
import { Construct } from "constructs";
import { MAX_REQUEST_BYTES } from "#shared/contracts/request.ts";

/**
 * What starts training:
 *  - a dataset becoming complete: S3 "Object Created" for `datasets/<name>/manifest.json` (written
 *    last by the uploader) submits the dispatcher with that key; it plans the run and submits it to
 *    the CPU queue (`head`) or the GPU queue (`finetune`). S3 events may be delivered twice; runs are
 *    idempotent (same data + options → same version id → nothing to do);
 *  - the nightly schedule (EventBridge Scheduler: cron + time zone) submits the same dispatcher for
 *    every dataset, which submits one training job per dataset that changed (cached features: each
 *    costs what its new images cost);
 *  - a console request: "Object Created" for `captures/<model>/requests/<id>.json` (written by the
 *    worker, signed with an operator's key) submits the same dispatcher with that key; it applies the
 *    model's waiting requests (jobs/train/src/requests/) and writes their outcomes under
 *    `captures/<model>/outcomes/`, which this rule does not match. Whoever holds the edge's key can
 *    start dispatcher jobs this way (each finds nothing signed to apply; no coalescing: the cost is bounded
 *    by the CPU queue's max vCPUs): the DLQ and job alerts see a flood.
 * A trigger that cannot submit its job (Batch throttling, a deleted queue, missing permissions) is not
 * lost: after its retries it lands in a dead-letter queue, which the alerts watch.
 * The local stand-in (infra/local/dispatcher.ts) implements the same two rules, running the training
 * itself where AWS has the dispatcher submit it (one record per run either way: the run closes it).
 */
export const MANIFEST_KEY_PATTERN = "datasets/*/manifest.json";
export const REQUEST_KEY_PATTERN = "captures/*/requests/*.json";

export class TrainingTriggers extends Construct {
  readonly manifestRule: events.Rule;
  readonly requestRule: events.Rule;
  readonly nightly: scheduler.Schedule;
  readonly deadLetters: sqs.Queue;

  constructor(
    scope: Construct,
    id: string,
    props: {
      bucket: s3.IBucket;
      /** The CPU queue the dispatcher runs on. */
      cpuQueue: batch.IJobQueue;
      /** The dispatcher (plans, then submits training jobs), for one dataset or for "*". */
      nightlyJobDefinition: batch.IJobDefinition;
      schedule: string;
      timeZone: string;
    },
  ) {
    super(scope, id);
    this.deadLetters = new sqs.Queue(this, "DeadLetters", {
      encryption: sqs.QueueEncryption.SQS_MANAGED,
      enforceSSL: true,
      retentionPeriod: Duration.days(14),
    });
    this.manifestRule = new events.Rule(this, "DatasetComplete", {
      description: "A dataset's manifest.json was written: train that dataset",
      eventPattern: {
        source: ["aws.s3"],
        detailType: ["Object Created"],
        detail: { bucket: { name: [props.bucket.bucketName] }, object: { key: [{ wildcard: MANIFEST_KEY_PATTERN }] } },
      },
    });
    this.manifestRule.addTarget(
      new targets.BatchJob(props.cpuQueue.jobQueueArn, props.cpuQueue, props.nightlyJobDefinition.jobDefinitionArn, props.nightlyJobDefinition, {
        jobName: "edgetune-dataset-complete",
        event: events.RuleTargetInput.fromObject({ Parameters: { dataset: events.EventField.fromPath("$.detail.object.key") } }),
        retryAttempts: 3,
        deadLetterQueue: this.deadLetters,
      }),
    );

    this.requestRule = new events.Rule(this, "ConsoleRequest", {
      description: "An operator asked for something in the console: the dispatcher applies that model's requests",
      eventPattern: {
        source: ["aws.s3"],
        detailType: ["Object Created"],
        // EventBridge's * spans slashes: the dispatcher checks the name again (requests/command.ts). The size
        // filter drops what the worker never writes (a request is under 1 KB) before it costs a job.
        detail: {
          bucket: { name: [props.bucket.bucketName] },
          object: { key: [{ wildcard: REQUEST_KEY_PATTERN }], size: [{ numeric: ["<=", MAX_REQUEST_BYTES] }] },
        },
      },
    });
    this.requestRule.addTarget(
      new targets.BatchJob(props.cpuQueue.jobQueueArn, props.cpuQueue, props.nightlyJobDefinition.jobDefinitionArn, props.nightlyJobDefinition, {
        jobName: "edgetune-console-request",
        event: events.RuleTargetInput.fromObject({ Parameters: { dataset: events.EventField.fromPath("$.detail.object.key") } }),
        retryAttempts: 3,
        deadLetterQueue: this.deadLetters,
      }),
    );

    const [, timeExpression] = /^cron\((.*)\)$/.exec(props.schedule) ?? [];
    if (!timeExpression) throw new Error(`schedule must be cron(…), got ${props.schedule}`);
    this.nightly = new scheduler.Schedule(this, "Nightly", {
      description: "Nightly: one training job per changed dataset",
      schedule: scheduler.ScheduleExpression.expression(props.schedule, TimeZone.of(props.timeZone)),
      target: new schedulerTargets.Universal({
        service: "batch",
        action: "submitJob",
        input: scheduler.ScheduleTargetInput.fromObject({
          JobName: "edgetune-nightly",
          JobQueue: props.cpuQueue.jobQueueArn,
          JobDefinition: props.nightlyJobDefinition.jobDefinitionArn,
        }),
        deadLetterQueue: this.deadLetters,
        retryAttempts: 3,
        policyStatements: [
          new iam.PolicyStatement({ actions: ["batch:SubmitJob"], resources: [props.cpuQueue.jobQueueArn, props.nightlyJobDefinition.jobDefinitionArn] }),
        ],
      }),
    });
  }
}
