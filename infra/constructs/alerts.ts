import { Duration } from "aws-cdk-lib";
import type * as batch from "aws-cdk-lib/aws-batch";
import * as cloudwatch from "aws-cdk-lib/aws-cloudwatch";
import * as cloudwatchActions from "aws-cdk-lib/aws-cloudwatch-actions";
import * as events from "aws-cdk-lib/aws-events";
import * as targets from "aws-cdk-lib/aws-events-targets";
import * as iam from "aws-cdk-lib/aws-iam";
import * as kms from "aws-cdk-lib/aws-kms";
import * as sns from "aws-cdk-lib/aws-sns";
import * as subscriptions from "aws-cdk-lib/aws-sns-subscriptions";
import type * as sqs from "aws-cdk-lib/aws-sqs";
import { Construct } from "constructs";

/**
 * Failure visibility: every job of our queues (GPU training, CPU nightly) that ends FAILED — including one cancelled
 * after waiting too long in RUNNABLE (no GPU capacity, a quota of 0) — is published to an encrypted,
 * TLS-only SNS topic, with an optional e-mail subscription; so is any trigger that could not submit
 * its job (a message in the triggers' dead-letter queue).
 */
export class TrainingAlerts extends Construct {
  readonly topic: sns.Topic;

  constructor(scope: Construct, id: string, props: { queues: batch.IJobQueue[]; deadLetters: sqs.IQueue; email?: string }) {
    super(scope, id);
    const key = new kms.Key(this, "TopicKey", { enableKeyRotation: true, description: "edgetune training alerts" });
    key.grant(new iam.ServicePrincipal("events.amazonaws.com"), "kms:Decrypt", "kms:GenerateDataKey*");
    this.topic = new sns.Topic(this, "Failures", { displayName: "edgetune training failures", masterKey: key, enforceSSL: true });
    if (props.email) this.topic.addSubscription(new subscriptions.EmailSubscription(props.email));
    new events.Rule(this, "JobFailed", {
      description: "An edgetune training job failed",
      eventPattern: {
        source: ["aws.batch"],
        detailType: ["Batch Job State Change"],
        detail: { status: ["FAILED"], jobQueue: props.queues.map((q) => q.jobQueueArn) },
      },
      targets: [new targets.SnsTopic(this.topic)],
    });
    key.grant(new iam.ServicePrincipal("cloudwatch.amazonaws.com"), "kms:Decrypt", "kms:GenerateDataKey*");
    new cloudwatch.Alarm(this, "TriggerNotDelivered", {
      alarmDescription: "A dataset upload or the nightly schedule could not submit its training job (see the dead-letter queue)",
      // Messages sent, not visible: they stay 14 days, and an alarm on what is visible would stay in ALARM
      // after the first one and never notify again.
      metric: props.deadLetters.metricNumberOfMessagesSent({ period: Duration.minutes(5), statistic: "Sum" }),
      threshold: 1,
      evaluationPeriods: 1,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    }).addAlarmAction(new cloudwatchActions.SnsAction(this.topic));
  }
}
