import type * as batch from "aws-cdk-lib/aws-batch";
import * as events from "aws-cdk-lib/aws-events";
import * as targets from "aws-cdk-lib/aws-events-targets";
import * as iam from "aws-cdk-lib/aws-iam";
import * as kms from "aws-cdk-lib/aws-kms";
import * as sns from "aws-cdk-lib/aws-sns";
import * as subscriptions from "aws-cdk-lib/aws-sns-subscriptions";
import { Construct } from "constructs";

/**
 * Failure visibility: every training job of our queue that ends FAILED is published to an encrypted,
 * TLS-only SNS topic, with an optional e-mail subscription.
 */
export class TrainingAlerts extends Construct {
  readonly topic: sns.Topic;

  constructor(scope: Construct, id: string, props: { queue: batch.IJobQueue; email?: string }) {
    super(scope, id);
    const key = new kms.Key(this, "TopicKey", { enableKeyRotation: true, description: "edgetune training alerts" });
    key.grant(new iam.ServicePrincipal("events.amazonaws.com"), "kms:Decrypt", "kms:GenerateDataKey*");
    this.topic = new sns.Topic(this, "Failures", { displayName: "edgetune training failures", masterKey: key, enforceSSL: true });
    if (props.email) this.topic.addSubscription(new subscriptions.EmailSubscription(props.email));
    new events.Rule(this, "JobFailed", {
      description: "An edgetune training job failed",
      eventPattern: { source: ["aws.batch"], detailType: ["Batch Job State Change"], detail: { status: ["FAILED"], jobQueue: [props.queue.jobQueueArn] } },
      targets: [new targets.SnsTopic(this.topic)],
    });
  }
}
