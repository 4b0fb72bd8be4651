import { Duration } from "aws-cdk-lib";
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
 * Failure visibility: every job of our queues (GPU training, CPU jobs) that ends FAILED — including one cancelled
 * after waiting too long in RUNNABLE (no GPU capacity, a quota of 0) — is published to an encrypted,
 * TLS-only SNS topic, with an optional e-mail subscription; so is any trigger that could not submit
 * its job (a message in the triggers' dead-letter queue), and any error of the failure-records Lambda. The same failures also reach the run's status
 * record (failure-records.ts); this topic is for the operator.
 */
export class TrainingAlerts extends Construct {
  readonly topic: sns.Topic;

  constructor(
    scope: Construct,
    id: string,
    props: {
      queueArns: string[];
      deadLetters: sqs.IQueue;
      email?: string;
      /** The failure-records Lambda's errors (failure-records.ts): when it fails, runs stay "running". */
      failureRecordErrors: cloudwatch.IMetric;
    },
  ) {
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
        detail: { status: ["FAILED"], jobQueue: props.queueArns },
      },
      targets: [new targets.SnsTopic(this.topic)],
    });
    key.grant(new iam.ServicePrincipal("cloudwatch.amazonaws.com"), "kms:Decrypt", "kms:GenerateDataKey*");
    const notDelivered = new cloudwatch.Alarm(this, "TriggerNotDelivered", {
      alarmDescription:
        "A dataset upload or the nightly schedule could not submit its training job, or a failed job could not be recorded in its run's status (see the dead-letter queue)",
      // Messages sent, not visible: they stay 14 days, and an alarm on what is visible would stay in ALARM
      // after the first one and never notify again.
      metric: props.deadLetters.metricNumberOfMessagesSent({ period: Duration.minutes(5), statistic: "Sum" }),
      threshold: 1,
      evaluationPeriods: 1,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
    notDelivered.addAlarmAction(new cloudwatchActions.SnsAction(this.topic));
    const recordsFailed = new cloudwatch.Alarm(this, "FailureRecordsFailed", {
      alarmDescription:
        "The Lambda that writes failed Batch jobs into their runs' status records failed: those runs may still say running (events it gave up on are in the dead-letter queue)",
      metric: props.failureRecordErrors,
      threshold: 1,
      evaluationPeriods: 1,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
    recordsFailed.addAlarmAction(new cloudwatchActions.SnsAction(this.topic));
    // The topic's policy is CDK's (enforceSSL, the rule's target), which replaces SNS's default: without
    // this statement the alarm's every notification fails with "not authorized to perform SNS:Publish".
    // Bound to this alarm, so no other account's or resource's CloudWatch can publish here.
    this.topic.addToResourcePolicy(
      new iam.PolicyStatement({
        sid: "CloudWatchAlarmsPublish",
        principals: [new iam.ServicePrincipal("cloudwatch.amazonaws.com")],
        actions: ["sns:Publish"],
        resources: [this.topic.topicArn],
        conditions: { ArnEquals: { "aws:SourceArn": [notDelivered.alarmArn, recordsFailed.alarmArn] } },
      }),
    );
  }
}
