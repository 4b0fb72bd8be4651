import * as path from "node:path";
import { Duration, Size, Stack } from "aws-cdk-lib";
import * as batch from "aws-cdk-lib/aws-batch";
import * as ec2 from "aws-cdk-lib/aws-ec2";
import { Platform } from "aws-cdk-lib/aws-ecr-assets";
import * as ecs from "aws-cdk-lib/aws-ecs";
import * as iam from "aws-cdk-lib/aws-iam";
import * as logs from "aws-cdk-lib/aws-logs";
import type * as s3 from "aws-cdk-lib/aws-s3";
import type * as secretsmanager from "aws-cdk-lib/aws-secretsmanager";
import { Construct } from "constructs";
import type { EdgetuneConfig } from "../config.ts";

/**
 * The core stack's training compute on AWS Batch: the CPU queue (Fargate Spot, then Fargate, 0 at rest)
 * with the head-only training job, the Embed array job and the dispatcher, and the role every training
 * job runs as. Retries happen only when Spot reclaims a task; any other failure is final and notified.
 * The GPU path (fine-tuning) is a stack of its own (gpu-training.ts), deployed after this one: its queue
 * and job definition have fixed names (`gpuPathNames`), so the dispatcher and the job role name them
 * here without this stack depending on that one, and a finetune run finds out at submission whether
 * the GPU path exists.
 */
export class TrainingBatch extends Construct {
  readonly cpuQueue: batch.JobQueue;
  readonly cpuJobDefinition: batch.EcsJobDefinition;
  readonly embedJobDefinition: batch.EcsJobDefinition;
  readonly nightlyJobDefinition: batch.EcsJobDefinition;
  readonly logGroup: logs.LogGroup;
  readonly jobRole: iam.Role;
  readonly nightlyRole: iam.Role;
  /** The GPU path's queue and job definition (deployed by the GPU stack, possibly not yet). */
  readonly gpu: { queueName: string; queueArn: string; jobDefinitionName: string; jobDefinitionArns: string };

  constructor(
    scope: Construct,
    id: string,
    props: {
      config: EdgetuneConfig;
      vpc: ec2.IVpc;
      securityGroup: ec2.ISecurityGroup;
      bucket: s3.IBucket;
      logRetention: logs.RetentionDays;
      /** The operators' console keys: the dispatcher applies only review decisions signed with one of them. */
      operatorKeys?: secretsmanager.ISecret;
    },
  ) {
    super(scope, id);
    const { config } = props;
    const stack = Stack.of(this);
    const names = gpuPathNames(stack.stackName);
    this.gpu = {
      queueName: names.queue,
      queueArn: stack.formatArn({ service: "batch", resource: "job-queue", resourceName: names.queue }),
      jobDefinitionName: names.jobDefinition,
      // Every revision: the dispatcher submits by name (the latest), a fanned-out run its own revision.
      jobDefinitionArns: stack.formatArn({ service: "batch", resource: "job-definition", resourceName: `${names.jobDefinition}:*` }),
    };
    const jobStateTimeLimitActions = runnableTimeLimits(config);
    // Small CPU work and head-only training: Fargate, no instances to manage, no GPU quota needed.
    const fargate = { vpc: props.vpc, vpcSubnets: { subnetType: ec2.SubnetType.PUBLIC }, securityGroups: [props.securityGroup], maxvCpus: config.cpuMaxVcpus };
    this.cpuQueue = new batch.JobQueue(this, "CpuQueue", {
      priority: 1,
      jobStateTimeLimitActions,
      computeEnvironments: [
        { order: 1, computeEnvironment: new batch.FargateComputeEnvironment(this, "CpuSpot", { ...fargate, spot: true }) },
        { order: 2, computeEnvironment: new batch.FargateComputeEnvironment(this, "CpuOnDemand", { ...fargate, spot: false }) },
      ],
    });

    this.logGroup = new logs.LogGroup(this, "Logs", { retention: props.logRetention });
    const jobRole = new iam.Role(this, "JobRole", {
      assumedBy: new iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
      description: "edgetune training job: read datasets and bases, write models, cache and run state",
    });
    this.jobRole = jobRole;
    // Least privilege by prefix: datasets/ is read-only for the job; bases, models and the feature
    // cache (and run status records) are read and written but never deleted (versions are immutable, and a bug must not be
    // able to destroy what is served); only its own run state (checkpoints, locks) may be deleted.
    // Explicit object actions, not CDK's grantRead/grantPut: those add s3:GetBucket* and s3:List* on the
    // whole bucket (every version, every multipart upload) to a role that reads only its prefixes.
    const objects = (...prefixes: string[]) => prefixes.map((p) => props.bucket.arnForObjects(p));
    jobRole.addToPolicy(
      new iam.PolicyStatement({
        actions: ["s3:GetObject"],
        resources: objects("datasets/*", "bases/*", "models/*", "cache/*", "status/*", "runs/*", "locks/*"),
      }),
    );
    jobRole.addToPolicy(
      new iam.PolicyStatement({
        actions: ["s3:PutObject", "s3:AbortMultipartUpload"],
        resources: objects("bases/*", "models/*", "cache/*", "status/*", "runs/*", "locks/*"),
      }),
    );
    jobRole.addToPolicy(new iam.PolicyStatement({ actions: ["s3:DeleteObject"], resources: objects("runs/*", "locks/*") }));
    // ListBucket on the whole bucket, deliberately without an s3:prefix condition: S3 answers 404 for a
    // missing key only to a caller that may list the bucket, else 403, and the job relies on 404 (a first
    // model has no pointer, a new version no metadata). A GET has no s3:prefix, so a prefix condition
    // would turn those 404s into 403s. Only ListBucket: no versions, uploads or bucket settings.
    jobRole.addToPolicy(new iam.PolicyStatement({ actions: ["s3:ListBucket"], resources: [props.bucket.bucketArn] }));

    const repoRoot = path.join(import.meta.dirname, "..", "..");
    // The Fargate jobs' image: the code without CUDA or libtensorflow (jobs/train/Dockerfile.cpu), linux/amd64
    // whatever machine builds it (an arm64 laptop would build arm64).
    const cpuImage = ecs.ContainerImage.fromAsset(repoRoot, { file: "jobs/train/Dockerfile.cpu", platform: Platform.LINUX_AMD64 });
    const fargateRetries = {
      retryAttempts: 3,
      retryStrategies: [
        // Fargate Spot reclaims a task with this status reason (the EC2 rule of the GPU jobs does not match it).
        batch.RetryStrategy.of(batch.Action.RETRY, batch.Reason.custom({ onStatusReason: "Your Spot Task was interrupted*" })),
        batch.RetryStrategy.of(batch.Action.EXIT, batch.Reason.custom({ onReason: "*" })),
      ],
    };
    const cpuContainer = (
      id: string,
      command: string[],
      role: iam.IRole,
      environment: Record<string, string>,
      size = { cpu: config.cpuJobVcpus, memoryGiB: config.cpuJobMemoryGiB },
      secrets: Record<string, batch.Secret> = {},
    ) =>
      new batch.EcsFargateContainerDefinition(this, id, {
        secrets,
        image: cpuImage,
        cpu: size.cpu,
        memory: Size.gibibytes(size.memoryGiB),
        jobRole: role,
        // Public subnets without a NAT gateway (network.ts): the task needs a public IP to pull the image.
        assignPublicIp: true,
        fargateCpuArchitecture: ecs.CpuArchitecture.X86_64,
        command,
        environment: {
          EDGETUNE_BUCKET: props.bucket.bucketName,
          EDGETUNE_DEFAULT_BASE: config.defaultBase,
          // No GPU here: tfjs on wasm, and the frozen base on ONNX Runtime's native CPU kernels.
          EDGETUNE_BACKEND: "wasm",
          ...environment,
        },
        logging: ecs.LogDriver.awsLogs({ streamPrefix: id.toLowerCase(), logGroup: this.logGroup }),
        user: "node",
      });
    // For datasets too large for one machine: a training run submits this as an array job on the CPU
    // queue (size = shards, see jobs/train/src/features/fan-out.ts); each child embeds its shard
    // (AWS_BATCH_JOB_ARRAY_INDEX) on ONNX Runtime, then the run finds every feature cached. An
    // operator may also submit it by hand.
    // A fixed name, like the GPU path's: fanned-out runs (the GPU stack's too) submit it by name, the
    // latest revision. Its ARN carries the revision, which every new image changes, and a value the GPU
    // stack imported could then never change (CloudFormation refuses to update an export in use).
    const embedName = embedJobName(stack.stackName);
    this.embedJobDefinition = new batch.EcsJobDefinition(this, "Embed", {
      jobDefinitionName: embedName,
      timeout: Duration.hours(config.jobTimeoutHours),
      ...fargateRetries,
      parameters: { dataset: "*", shards: "1" },
      container: cpuContainer("EmbedContainer", ["embed", "--dataset", "Ref::dataset", "--shards", "Ref::shards", "--json"], jobRole, {}),
    });
    // Head-only training needs no GPU: the frozen base's features on ONNX Runtime, the head on tfjs.
    // CPU Spot capacity is plentiful and cheap, and not subject to the G-instance quota (0 on new accounts).
    this.cpuJobDefinition = new batch.EcsJobDefinition(this, "TrainCpu", {
      timeout: Duration.hours(config.jobTimeoutHours),
      ...fargateRetries,
      parameters: { dataset: "*" },
      container: cpuContainer("CpuContainer", ["train", "--dataset", "Ref::dataset", "--json"], jobRole, {
        ...lockWaitEnv(config),
        ...fanOutEnv(config, "cpu", { embedName, cpuQueueArn: this.cpuQueue.jobQueueArn, ownQueueArn: this.cpuQueue.jobQueueArn }),
      }),
    });
    // The continuation of a fanned-out run is the run's own definition again, on its own queue — at the
    // revision the run started with (Batch describes it so), which a redeploy may have superseded. Embed
    // children by name: whichever revision is the latest.
    jobRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        actions: ["batch:SubmitJob"],
        resources: [
          stack.formatArn({ service: "batch", resource: "job-definition", resourceName: `${embedName}:*` }),
          this.gpu.jobDefinitionArns,
          stack.formatArn({ service: "batch", resource: "job-definition", resourceName: `${this.cpuJobDefinition.jobDefinitionName}:*` }),
          this.gpu.queueArn,
          this.cpuQueue.jobQueueArn,
        ],
      }),
    );
    jobRole.addToPrincipalPolicy(new iam.PolicyStatement({ actions: ["batch:DescribeJobs"], resources: ["*"] }));
    // The dispatcher, on the CPU queue: run by every dataset upload (one dataset) and by the nightly
    // schedule ("*"). It plans and submits one Train job per changed dataset (jobs/train/src/nightly.ts):
    // `head` to the CPU queue, `finetune` to the GPU queue if the GPU stack is deployed (else the run fails
    // at once with that reason); one slow or failing dataset cannot starve or fail the others, and
    // unchanged ones cost nothing. Its role reads datasets and models, may store a base it plans with
    // (bases/), and submits Train jobs; nothing else.
    const nightlyRole = new iam.Role(this, "NightlyRole", {
      assumedBy: new iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
      description: "edgetune dispatcher: read datasets and models, submit training jobs",
    });
    this.nightlyRole = nightlyRole;
    nightlyRole.addToPolicy(
      new iam.PolicyStatement({ actions: ["s3:GetObject"], resources: objects("datasets/*", "models/*", "bases/*", "captures/*", "status/*") }),
    );
    // The traffic loop's nightly step (traffic/traffic.ts): reviewed captures move into their dataset —
    // the only writes under datasets/ any role has, and only of files named captured-* — and the edge's
    // captures and counters are rolled up and cleaned. status/: a finetune run that cannot be submitted
    // (no GPU path, no G quota) closes its upload's record itself.
    nightlyRole.addToPolicy(
      new iam.PolicyStatement({
        actions: ["s3:PutObject", "s3:AbortMultipartUpload"],
        resources: objects("bases/*", "captures/*", "datasets/*/captured-*", "status/*"),
      }),
    );
    nightlyRole.addToPolicy(new iam.PolicyStatement({ actions: ["s3:DeleteObject"], resources: objects("captures/*") }));
    // Console requests (jobs/train/src/requests/requests.ts), the console's only way to change anything:
    // a rollback or promotion writes the pointer (current.json, never a version's files) under the model's
    // lock; an export writes one file beside a version (…/export/); each request is claimed once under
    // requests/, where the edge's key cannot write. IAM's * spans slashes: models/*/export/* is
    // models/<name>/<version>/export/<file>.
    nightlyRole.addToPolicy(new iam.PolicyStatement({ actions: ["s3:GetObject"], resources: objects("locks/*", "requests/*") }));
    nightlyRole.addToPolicy(
      new iam.PolicyStatement({
        actions: ["s3:PutObject", "s3:AbortMultipartUpload"],
        resources: objects("models/*/current.json", "models/*/export/*", "locks/*", "requests/*"),
      }),
    );
    nightlyRole.addToPolicy(new iam.PolicyStatement({ actions: ["s3:DeleteObject"], resources: objects("locks/*") }));
    // locks/* also covers the push locks (locks/datasets/<name>.json), which only `edgetune push` takes:
    // the dispatcher needs a model's lock (locks/<model>.json) and never a dataset's.
    nightlyRole.addToPolicy(
      new iam.PolicyStatement({ effect: iam.Effect.DENY, actions: ["s3:PutObject", "s3:DeleteObject"], resources: objects("locks/datasets/*") }),
    );
    // Unconditional, for the same 404-vs-403 reason as the job role's.
    nightlyRole.addToPolicy(new iam.PolicyStatement({ actions: ["s3:ListBucket"], resources: [props.bucket.bucketArn] }));
    nightlyRole.addToPolicy(
      new iam.PolicyStatement({
        actions: ["batch:SubmitJob"],
        resources: [this.gpu.jobDefinitionArns, this.cpuJobDefinition.jobDefinitionArn, this.gpu.queueArn, this.cpuQueue.jobQueueArn],
      }),
    );
    // Whether the GPU path is deployed (its queue exists and is enabled), and the account's G quota a
    // finetune run must fit: neither API has resource-level permissions.
    nightlyRole.addToPolicy(
      new iam.PolicyStatement({
        actions: ["batch:DescribeJobQueues", "servicequotas:GetServiceQuota", "servicequotas:GetAWSDefaultServiceQuota"],
        resources: ["*"],
      }),
    );
    this.nightlyJobDefinition = new batch.EcsJobDefinition(this, "Nightly", {
      timeout: Duration.minutes(30),
      ...fargateRetries,
      parameters: { dataset: "*" },
      container: cpuContainer(
        "NightlyContainer",
        ["train", "--dataset", "Ref::dataset", "--json"],
        nightlyRole,
        {
          EDGETUNE_DISPATCH: "1",
          // Names, not ARNs: the GPU stack may not exist (yet); SubmitJob takes either.
          EDGETUNE_JOB_QUEUE: this.gpu.queueName,
          EDGETUNE_TRAIN_JOB_DEFINITION: this.gpu.jobDefinitionName,
          EDGETUNE_GPU_JOB_VCPUS: String(config.jobVcpus),
          EDGETUNE_GPU_SPOT: String(config.spot),
          EDGETUNE_CPU_JOB_QUEUE: this.cpuQueue.jobQueueArn,
          EDGETUNE_CPU_TRAIN_JOB_DEFINITION: this.cpuJobDefinition.jobDefinitionArn,
        },
        { cpu: 1, memoryGiB: 2 },
        // Review decisions recorded through the console carry an HMAC made with the operator's key; the
        // dispatcher verifies them with these keys, so the edge's S3 key alone cannot accept images.
        props.operatorKeys ? { EDGETUNE_CONSOLE_KEYS: batch.Secret.fromSecretsManager(props.operatorKeys) } : {},
      ),
    });
  }
}

/** The GPU path's fixed names, derived from the core stack's name (two deployments in one account do not collide). */
export function gpuPathNames(coreStackName: string): { queue: string; jobDefinition: string } {
  return { queue: `${coreStackName}-finetune`, jobDefinition: `${coreStackName}-finetune` };
}

/** The Embed array job's fixed name (see TrainingBatch): the GPU stack passes it to its jobs without importing anything that changes with an image. */
export function embedJobName(coreStackName: string): string {
  return `${coreStackName}-embed`;
}

/** A job stuck in RUNNABLE for want of capacity or by misconfiguration: cancelled (→ FAILED, recorded, alerted) with the reason. */
export function runnableTimeLimits(config: EdgetuneConfig): batch.JobStateTimeLimitAction[] {
  return [
    batch.JobStateTimeLimitActionsReason.INSUFFICIENT_INSTANCE_CAPACITY,
    batch.JobStateTimeLimitActionsReason.COMPUTE_ENVIRONMENT_MAX_RESOURCE,
    batch.JobStateTimeLimitActionsReason.JOB_RESOURCE_REQUIREMENT,
  ].map((reason) => ({
    reason,
    maxTime: Duration.minutes(config.runnableTimeoutMinutes),
    action: batch.JobStateTimeLimitActionsAction.CANCEL,
    state: batch.JobStateTimeLimitActionsState.RUNNABLE,
  }));
}

/** A run waiting for another run of the same model gives up before its own timeout: 30 min before it, or at half of it for jobs shorter than an hour. */
export function lockWaitEnv(config: EdgetuneConfig): Record<string, string> {
  return { EDGETUNE_LOCK_WAIT_MS: String(Math.round(Math.max(config.jobTimeoutHours * 30, config.jobTimeoutHours * 60 - 30)) * 60_000) };
}

/**
 * Tells a training job how to fan its feature extraction out to Embed array jobs on the CPU queue.
 * Only where the CPU queue can run a child beside the waiting parent (a CPU parent takes a place on
 * it too): otherwise the parent would wait for children that never start, so it embeds everything itself.
 */
export function fanOutEnv(
  config: EdgetuneConfig,
  parent: "gpu" | "cpu",
  jobs: { embedName: string; cpuQueueArn: string; ownQueueArn: string },
): Record<string, string> {
  const places = Math.floor(config.cpuMaxVcpus / config.cpuJobVcpus) - (parent === "cpu" ? 1 : 0);
  if (places < 1) return {};
  return {
    EDGETUNE_EMBED_JOB_DEFINITION: jobs.embedName,
    EDGETUNE_EMBED_JOB_QUEUE: jobs.cpuQueueArn,
    EDGETUNE_JOB_QUEUE: jobs.ownQueueArn,
    EDGETUNE_FAN_OUT_IMAGES_PER_SHARD: String(config.fanOutImagesPerShard),
    EDGETUNE_FAN_OUT_MAX_SHARDS: String(Math.min(config.fanOutMaxShards, places)),
  };
}
