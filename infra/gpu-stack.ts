import { CfnOutput, Stack, type StackProps } from "aws-cdk-lib";
import type { Construct } from "constructs";
import type { EdgetuneConfig } from "./config.ts";
import { GpuTraining } from "./constructs/gpu-training.ts";
import { embedJobName, gpuPathNames } from "./constructs/training-batch.ts";
import type { EdgetuneStack } from "./stack.ts";

/**
 * The GPU fine-tuning path on its own (`cdk deploy EdgetuneGpu`, after the core): its CUDA image is the
 * fragile build, and a stack of its own means a failure there leaves the core and the worker serving.
 * It uses the core's network, bucket, job role, logs and CPU queue (CloudFormation exports, none of
 * which changes when an image does) and the Embed job by its fixed name; the core names this stack's
 * queue and job definition without depending on it.
 */
export class EdgetuneGpuStack extends Stack {
  readonly gpu: GpuTraining;

  constructor(scope: Construct, id: string, props: StackProps & { config: EdgetuneConfig; core: EdgetuneStack }) {
    super(scope, id, props);
    const { core } = props;
    this.gpu = new GpuTraining(this, "Gpu", {
      config: props.config,
      names: gpuPathNames(core.stackName),
      vpc: core.network.vpc,
      securityGroup: core.network.securityGroup,
      bucket: core.data.bucket,
      jobRole: core.training.jobRole,
      logGroup: core.training.logGroup,
      embedJobName: embedJobName(core.stackName),
      cpuQueueArn: core.training.cpuQueue.jobQueueArn,
    });
    new CfnOutput(this, "JobQueueArn", { value: this.gpu.queue.jobQueueArn });
    new CfnOutput(this, "JobDefinitionArn", { value: this.gpu.jobDefinition.jobDefinitionArn });
  }
}
