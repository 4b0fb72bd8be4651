import { CfnOutput, Duration, Stack, type StackProps } from "aws-cdk-lib";
import type * as logs from "aws-cdk-lib/aws-logs";
import type { Construct } from "constructs";
import type { EdgetuneConfig } from "./config.ts";
import { TrainingAlerts } from "./constructs/alerts.ts";
import { DataBucket } from "./constructs/data-bucket.ts";
import { EdgeCredentials } from "./constructs/edge-credentials.ts";
import { FailureRecords } from "./constructs/failure-records.ts";
import { BatchNetwork } from "./constructs/network.ts";
import { TrainingBatch } from "./constructs/training-batch.ts";
import { TrainingTriggers } from "./constructs/triggers.ts";

/**
 * The core of edgetune, everything a head-training service needs: bucket → triggers → dispatcher → CPU
 * Batch jobs → models the edge reads, with alerts, failure records and the edge's credentials. The GPU
 * fine-tuning path is `EdgetuneGpuStack` (gpu-stack.ts), deployed after this one and apart from it.
 */
export class EdgetuneStack extends Stack {
  readonly data: DataBucket;
  readonly network: BatchNetwork;
  readonly training: TrainingBatch;

  constructor(scope: Construct, id: string, props: StackProps & { config: EdgetuneConfig }) {
    super(scope, id, props);
    const { config } = props;
    const logRetention = config.logRetentionDays as logs.RetentionDays;
    const data = new DataBucket(this, "Data", config);
    const network = new BatchNetwork(this, "Network", { logRetention });
    const edge = new EdgeCredentials(this, "Edge", { bucket: data.bucket });
    const training = new TrainingBatch(this, "Training", {
      config,
      vpc: network.vpc,
      securityGroup: network.securityGroup,
      bucket: data.bucket,
      logRetention,
      operatorKeys: edge.consoleKeys,
    });
    this.data = data;
    this.network = network;
    this.training = training;
    const triggers = new TrainingTriggers(this, "Triggers", {
      bucket: data.bucket,
      cpuQueue: training.cpuQueue,
      nightlyJobDefinition: training.nightlyJobDefinition,
      schedule: config.schedule,
      timeZone: config.timeZone,
    });
    // Both queues by ARN: the GPU queue's name is fixed, so the rules cover it before it exists.
    const queueArns = [training.gpu.queueArn, training.cpuQueue.jobQueueArn];
    const records = new FailureRecords(this, "FailureRecords", { bucket: data.bucket, queueArns, deadLetters: triggers.deadLetters, logRetention });
    const alerts = new TrainingAlerts(this, "Alerts", {
      queueArns,
      deadLetters: triggers.deadLetters,
      email: config.alarmEmail,
      failureRecordErrors: records.handler.metricErrors({ period: Duration.minutes(5), statistic: "Sum" }),
    });

    new CfnOutput(this, "BucketName", { value: data.bucket.bucketName, description: "EDGETUNE_BUCKET / the worker's S3_BUCKET" });
    new CfnOutput(this, "Region", { value: this.region, description: "the worker's S3_REGION" });
    new CfnOutput(this, "EdgeCredentialsSecretArn", {
      value: edge.secret.secretArn,
      description: "read-only S3 key for the worker (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
    });
    new CfnOutput(this, "ApiKeysSecretArn", { value: edge.apiKeys.secretArn, description: "the Worker's API_KEYS, generated once" });
    new CfnOutput(this, "ConsoleKeysSecretArn", {
      value: edge.consoleKeys.secretArn,
      description: "the Worker's CONSOLE_API_KEYS (operators), generated once",
    });
    new CfnOutput(this, "CpuJobQueueArn", { value: training.cpuQueue.jobQueueArn });
    new CfnOutput(this, "EmbedJobDefinitionArn", {
      value: training.embedJobDefinition.jobDefinitionArn,
      description: "array job: edgetune embed --shards N, for very large datasets",
    });
    new CfnOutput(this, "FailureTopicArn", { value: alerts.topic.topicArn });
    new CfnOutput(this, "AlertEmail", { value: config.alarmEmail ?? "none", description: "who the failure topic e-mails" });
  }
}
