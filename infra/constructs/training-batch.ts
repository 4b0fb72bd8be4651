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
 * The GPU training job on AWS Batch: managed EC2 compute environments on the current NVIDIA ECS AMI
 * (spot first, on-demand as fallback, both scaling to zero), one queue, and a job definition that
 * runs `edgetune train` from the image built out of jobs/train/Dockerfile with 1 GPU. Retries happen
 * only when spot reclaims the host; any other failure is final and notified. The nightly dispatcher,
 * which only plans and submits, runs on a CPU queue of its own (Fargate Spot, then Fargate) with a role
 * of its own: it never holds a GPU host, and it cannot write models or the feature cache.
 */
export class TrainingBatch extends Construct {
  readonly queue: batch.JobQueue;
  readonly cpuQueue: batch.JobQueue;
  readonly cpuJobDefinition: batch.EcsJobDefinition;
  readonly jobDefinition: batch.EcsJobDefinition;
  readonly embedJobDefinition: batch.EcsJobDefinition;
  readonly nightlyJobDefinition: batch.EcsJobDefinition;
  readonly logGroup: logs.LogGroup;

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
    const instanceTypes = config.instanceTypes.map((t) => new ec2.InstanceType(t));
    const common = {
      vpc: props.vpc,
      vpcSubnets: { subnetType: ec2.SubnetType.PUBLIC },
      securityGroups: [props.securityGroup],
      instanceTypes,
      useOptimalInstanceClasses: false,
      minvCpus: 0,
      maxvCpus: config.maxVcpus,
      images: [{ imageType: batch.EcsMachineImageType.ECS_AL2023_NVIDIA }],
      updateToLatestImageVersion: true,
    } satisfies Partial<batch.ManagedEc2EcsComputeEnvironmentProps>;
    const computeEnvironments: batch.OrderedComputeEnvironment[] = [];
    if (config.spot) {
      computeEnvironments.push({
        order: 1,
        computeEnvironment: new batch.ManagedEc2EcsComputeEnvironment(this, "Spot", {
          ...common,
          spot: true,
          allocationStrategy: batch.AllocationStrategy.SPOT_PRICE_CAPACITY_OPTIMIZED,
        }),
      });
    }
    computeEnvironments.push({
      order: computeEnvironments.length + 1,
      computeEnvironment: new batch.ManagedEc2EcsComputeEnvironment(this, "OnDemand", {
        ...common,
        spot: false,
        allocationStrategy: batch.AllocationStrategy.BEST_FIT_PROGRESSIVE,
      }),
    });
    // Stuck in RUNNABLE for want of capacity or by misconfiguration: cancelled (→ FAILED, alerted) with the reason.
    const jobStateTimeLimitActions = [
      batch.JobStateTimeLimitActionsReason.INSUFFICIENT_INSTANCE_CAPACITY,
      batch.JobStateTimeLimitActionsReason.COMPUTE_ENVIRONMENT_MAX_RESOURCE,
      batch.JobStateTimeLimitActionsReason.JOB_RESOURCE_REQUIREMENT,
    ].map((reason) => ({
      reason,
      maxTime: Duration.minutes(config.runnableTimeoutMinutes),
      action: batch.JobStateTimeLimitActionsAction.CANCEL,
      state: batch.JobStateTimeLimitActionsState.RUNNABLE,
    }));
    this.queue = new batch.JobQueue(this, "Queue", { computeEnvironments, priority: 1, jobStateTimeLimitActions });
    // Small CPU work (the nightly dispatcher): Fargate, no instances to manage, no GPU quota needed.
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
    // Least privilege by prefix: datasets/ is read-only for the job; bases, models and the feature
    // cache (and run status records) are read and written but never deleted (versions are immutable, and a bug must not be
    // able to destroy what is served); only its own run state (checkpoints, locks) may be deleted.
    props.bucket.grantRead(jobRole, "datasets/*");
    for (const prefix of ["bases/*", "models/*", "cache/*", "status/*"]) {
      props.bucket.grantRead(jobRole, prefix);
      props.bucket.grantPut(jobRole, prefix);
    }
    for (const prefix of ["runs/*", "locks/*"]) {
      props.bucket.grantReadWrite(jobRole, prefix);
      props.bucket.grantDelete(jobRole, prefix);
    }
    // ListBucket on the whole bucket, deliberately without an s3:prefix condition: S3 answers 404 for a
    // missing key only to a caller that may list the bucket, else 403, and the job relies on 404 (a first
    // model has no pointer, a new version no metadata). A GET has no s3:prefix, so a prefix condition
    // would turn those 404s into 403s.
    jobRole.addToPolicy(new iam.PolicyStatement({ actions: ["s3:ListBucket"], resources: [props.bucket.bucketArn] }));

    const repoRoot = path.join(import.meta.dirname, "..", "..");
    // linux/amd64 whatever machine builds it: the GPU hosts are x86 (an arm64 laptop would build arm64).
    const image = ecs.ContainerImage.fromAsset(repoRoot, { file: "jobs/train/Dockerfile", platform: Platform.LINUX_AMD64 });
    // The Fargate jobs' image: the same code without CUDA or libtensorflow (jobs/train/Dockerfile.cpu).
    const cpuImage = ecs.ContainerImage.fromAsset(repoRoot, { file: "jobs/train/Dockerfile.cpu", platform: Platform.LINUX_AMD64 });
    const container = (
      id: string,
      command: string[],
      environment: Record<string, string> = {},
      size = { cpu: config.jobVcpus, memoryGiB: config.jobMemoryGiB, gpu: 1 },
    ) =>
      new batch.EcsEc2ContainerDefinition(this, id, {
        image,
        cpu: size.cpu,
        memory: Size.gibibytes(size.memoryGiB),
        gpu: size.gpu || undefined,
        jobRole,
        command,
        environment: {
          EDGETUNE_BUCKET: props.bucket.bucketName,
          EDGETUNE_DEFAULT_BASE: config.defaultBase,
          // A run waiting for another run of the same model gives up before its own timeout: 30 min
          // before it, or at half of it for jobs shorter than an hour.
          EDGETUNE_LOCK_WAIT_MS: String(Math.round(Math.max(config.jobTimeoutHours * 30, config.jobTimeoutHours * 60 - 30)) * 60_000),
          ...environment,
        },
        logging: ecs.LogDriver.awsLogs({ streamPrefix: id.toLowerCase(), logGroup: this.logGroup }),
        readonlyRootFilesystem: false,
        user: "node",
      });
    const retries = {
      retryAttempts: 3,
      retryStrategies: [
        batch.RetryStrategy.of(batch.Action.RETRY, batch.Reason.SPOT_INSTANCE_RECLAIMED),
        batch.RetryStrategy.of(batch.Action.EXIT, batch.Reason.custom({ onReason: "*" })),
      ],
    };
    const fargateRetries = {
      retryAttempts: 3,
      retryStrategies: [
        // Fargate Spot reclaims a task with this status reason (the EC2 rule above does not match it).
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
    this.embedJobDefinition = new batch.EcsJobDefinition(this, "Embed", {
      timeout: Duration.hours(config.jobTimeoutHours),
      ...fargateRetries,
      parameters: { dataset: "*", shards: "1" },
      container: cpuContainer("EmbedContainer", ["embed", "--dataset", "Ref::dataset", "--shards", "Ref::shards", "--json"], jobRole, {}),
    });
    const lockWait = { EDGETUNE_LOCK_WAIT_MS: String(Math.round(Math.max(config.jobTimeoutHours * 30, config.jobTimeoutHours * 60 - 30)) * 60_000) };
    this.jobDefinition = new batch.EcsJobDefinition(this, "Train", {
      timeout: Duration.hours(config.jobTimeoutHours),
      ...retries,
      parameters: { dataset: "*" },
      // `Ref::dataset`: the dataset the dispatcher submits (a name, or a manifest key).
      container: container("Container", ["train", "--dataset", "Ref::dataset", "--json"], this.fanOut(config, "gpu")),
    });
    // Head-only training needs no GPU: the frozen base's features on ONNX Runtime, the head on tfjs.
    // CPU Spot capacity is plentiful and cheap, and not subject to the G-instance quota (0 on new accounts).
    this.cpuJobDefinition = new batch.EcsJobDefinition(this, "TrainCpu", {
      timeout: Duration.hours(config.jobTimeoutHours),
      ...fargateRetries,
      parameters: { dataset: "*" },
      container: cpuContainer("CpuContainer", ["train", "--dataset", "Ref::dataset", "--json"], jobRole, {
        ...lockWait,
        ...this.fanOut(config, "cpu"),
      }),
    });
    // The continuation of a fanned-out run is the run's own definition again, on its own queue — at the
    // revision the run started with (Batch describes it so), which a redeploy may have superseded.
    const anyRevision = (d: batch.EcsJobDefinition) =>
      Stack.of(this).formatArn({ service: "batch", resource: "job-definition", resourceName: `${d.jobDefinitionName}:*` });
    jobRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        actions: ["batch:SubmitJob"],
        resources: [
          this.embedJobDefinition.jobDefinitionArn,
          anyRevision(this.jobDefinition),
          anyRevision(this.cpuJobDefinition),
          this.queue.jobQueueArn,
          this.cpuQueue.jobQueueArn,
        ],
      }),
    );
    jobRole.addToPrincipalPolicy(new iam.PolicyStatement({ actions: ["batch:DescribeJobs"], resources: ["*"] }));
    // The dispatcher, on the CPU queue: run by every dataset upload (one dataset) and by the nightly
    // schedule ("*"). It plans and submits one Train job per changed dataset (jobs/train/src/nightly.ts):
    // `head` to the CPU queue, `finetune` to the GPU queue; one slow or failing dataset cannot starve or
    // fail the others, and unchanged ones cost nothing. Its role reads datasets and models, may store a
    // base it plans with (bases/), and submits Train jobs; nothing else.
    const nightlyRole = new iam.Role(this, "NightlyRole", {
      assumedBy: new iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
      description: "edgetune dispatcher: read datasets and models, submit training jobs",
    });
    props.bucket.grantRead(nightlyRole, "datasets/*");
    props.bucket.grantRead(nightlyRole, "models/*");
    props.bucket.grantRead(nightlyRole, "bases/*");
    props.bucket.grantPut(nightlyRole, "bases/*");
    // The traffic loop's nightly step (traffic/traffic.ts): reviewed captures move into their dataset —
    // the only writes under datasets/ any role has, and only of files named captured-* — and the edge's
    // captures and counters are rolled up and cleaned.
    props.bucket.grantReadWrite(nightlyRole, "captures/*");
    props.bucket.grantDelete(nightlyRole, "captures/*");
    props.bucket.grantPut(nightlyRole, "datasets/*/captured-*");
    nightlyRole.addToPolicy(new iam.PolicyStatement({ actions: ["s3:ListBucket"], resources: [props.bucket.bucketArn] }));
    nightlyRole.addToPolicy(
      new iam.PolicyStatement({
        actions: ["batch:SubmitJob"],
        resources: [this.jobDefinition.jobDefinitionArn, this.cpuJobDefinition.jobDefinitionArn, this.queue.jobQueueArn, this.cpuQueue.jobQueueArn],
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
          EDGETUNE_JOB_QUEUE: this.queue.jobQueueArn,
          EDGETUNE_TRAIN_JOB_DEFINITION: this.jobDefinition.jobDefinitionArn,
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

  /**
   * Tells a training job how to fan its feature extraction out to Embed array jobs on the CPU queue.
   * Only where the CPU queue can run a child beside the waiting parent (a CPU parent takes a place on
   * it too): otherwise the parent would wait for children that never start, so it embeds everything itself.
   */
  private fanOut(config: EdgetuneConfig, parent: "gpu" | "cpu"): Record<string, string> {
    const places = Math.floor(config.cpuMaxVcpus / config.cpuJobVcpus) - (parent === "cpu" ? 1 : 0);
    if (places < 1) return {};
    return {
      EDGETUNE_EMBED_JOB_DEFINITION: this.embedJobDefinition.jobDefinitionArn,
      EDGETUNE_EMBED_JOB_QUEUE: this.cpuQueue.jobQueueArn,
      EDGETUNE_JOB_QUEUE: (parent === "cpu" ? this.cpuQueue : this.queue).jobQueueArn,
      EDGETUNE_FAN_OUT_IMAGES_PER_SHARD: String(config.fanOutImagesPerShard),
      EDGETUNE_FAN_OUT_MAX_SHARDS: String(Math.min(config.fanOutMaxShards, places)),
    };
  }
}
