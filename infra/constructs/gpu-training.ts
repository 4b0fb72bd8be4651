import * as path from "node:path";
import { Duration, Size } from "aws-cdk-lib";
import * as batch from "aws-cdk-lib/aws-batch";
import * as ec2 from "aws-cdk-lib/aws-ec2";
import { Platform } from "aws-cdk-lib/aws-ecr-assets";
import * as ecs from "aws-cdk-lib/aws-ecs";
import type * as iam from "aws-cdk-lib/aws-iam";
import type * as logs from "aws-cdk-lib/aws-logs";
import type * as s3 from "aws-cdk-lib/aws-s3";
import { Construct } from "constructs";
import type { EdgetuneConfig } from "../config.ts";
import { fanOutEnv, lockWaitEnv, runnableTimeLimits } from "./training-batch.ts";

/**
 * The GPU fine-tuning path, a stack of its own so that its image (CUDA base, libtensorflow) can fail to
 * build without taking the core down: managed EC2 compute environments on the current NVIDIA ECS AMI
 * (spot first, on-demand as fallback, both scaling to zero), one queue and the `Train` job definition,
 * both under the fixed names the core's dispatcher submits to. The job runs as the core's job role and
 * fans out to the core's Embed job on the CPU queue.
 */
export class GpuTraining extends Construct {
  readonly queue: batch.JobQueue;
  readonly jobDefinition: batch.EcsJobDefinition;

  constructor(
    scope: Construct,
    id: string,
    props: {
      config: EdgetuneConfig;
      names: { queue: string; jobDefinition: string };
      vpc: ec2.IVpc;
      securityGroup: ec2.ISecurityGroup;
      bucket: s3.IBucket;
      jobRole: iam.IRole;
      logGroup: logs.ILogGroup;
      /** The core's Embed job definition, by its fixed name (SubmitJob takes the latest revision). */
      embedJobName: string;
      cpuQueueArn: string;
    },
  ) {
    super(scope, id);
    const { config } = props;
    const common = {
      vpc: props.vpc,
      vpcSubnets: { subnetType: ec2.SubnetType.PUBLIC },
      securityGroups: [props.securityGroup],
      instanceTypes: config.instanceTypes.map((t) => new ec2.InstanceType(t)),
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
    this.queue = new batch.JobQueue(this, "Queue", {
      jobQueueName: props.names.queue,
      computeEnvironments,
      priority: 1,
      jobStateTimeLimitActions: runnableTimeLimits(config),
    });

    const repoRoot = path.join(import.meta.dirname, "..", "..");
    // linux/amd64 whatever machine builds it: the GPU hosts are x86. The CUDA base comes pinned by digest
    // from the config (no default: see config.ts); the deploy refuses the GPU step without it, and an
    // empty value fails the Docker build on its first line rather than pulling a moving tag.
    const image = ecs.ContainerImage.fromAsset(repoRoot, {
      file: "jobs/train/Dockerfile",
      platform: Platform.LINUX_AMD64,
      buildArgs: { CUDA_BASE_IMAGE: config.gpuBaseImage ?? "" },
    });
    const container = new batch.EcsEc2ContainerDefinition(this, "Container", {
      image,
      cpu: config.jobVcpus,
      memory: Size.gibibytes(config.jobMemoryGiB),
      gpu: 1,
      jobRole: props.jobRole,
      command: ["train", "--dataset", "Ref::dataset", "--json"],
      environment: {
        EDGETUNE_BUCKET: props.bucket.bucketName,
        EDGETUNE_DEFAULT_BASE: config.defaultBase,
        // libtensorflow or nothing: a driver or CUDA mismatch fails the run at its start with the reason
        // (jobs/train/src/model/backend.ts) instead of training on wasm for hours on a GPU host.
        EDGETUNE_BACKEND: "tensorflow",
        ...lockWaitEnv(config),
        ...fanOutEnv(config, "gpu", { embedName: props.embedJobName, cpuQueueArn: props.cpuQueueArn, ownQueueArn: this.queue.jobQueueArn }),
      },
      logging: ecs.LogDriver.awsLogs({ streamPrefix: "container", logGroup: props.logGroup }),
      readonlyRootFilesystem: false,
      user: "node",
    });
    this.jobDefinition = new batch.EcsJobDefinition(this, "Train", {
      jobDefinitionName: props.names.jobDefinition,
      timeout: Duration.hours(config.jobTimeoutHours),
      retryAttempts: 3,
      retryStrategies: [
        batch.RetryStrategy.of(batch.Action.RETRY, batch.Reason.SPOT_INSTANCE_RECLAIMED),
        batch.RetryStrategy.of(batch.Action.EXIT, batch.Reason.custom({ onReason: "*" })),
      ],
      // `Ref::dataset`: the dataset the dispatcher submits (a name, or a manifest key).
      parameters: { dataset: "*" },
      container,
    });
  }
}
