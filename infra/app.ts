#!/usr/bin/env node
/**
 * The CDK app (`npx cdk synth`, `npm run deploy`): two stacks deployed apart — `Edgetune`, the core
 * (head training, triggers, alerts, the edge's credentials), and `EdgetuneGpu`, the fine-tuning path
 * (its CUDA image is the fragile build). Settings come from the `edgetune` context key; cdk-nag's
 * AwsSolutions rules run as a validation plugin, so a violation fails synth.
 */
import { App, Validations } from "aws-cdk-lib";
import { AwsSolutionsChecks } from "cdk-nag";
import { configFromContext } from "./config.ts";
import { EdgetuneGpuStack } from "./gpu-stack.ts";
import { acknowledgeGpuNagFindings, acknowledgeNagFindings } from "./nag.ts";
import { EdgetuneStack } from "./stack.ts";
import { STACKS } from "./stack-names.ts";

export function buildApp(context: Record<string, unknown> = {}): { app: App; stack: EdgetuneStack; gpu: EdgetuneGpuStack } {
  const app = new App({ context });
  const config = configFromContext(app.node.tryGetContext("edgetune"));
  const env = { account: process.env.CDK_DEFAULT_ACCOUNT, region: process.env.CDK_DEFAULT_REGION };
  const stack = new EdgetuneStack(app, STACKS.core, {
    config,
    env,
    description: "edgetune: transfer learning from S3 datasets to models served at the edge (core)",
  });
  const gpu = new EdgetuneGpuStack(app, STACKS.gpu, { config, core: stack, env, description: "edgetune: the GPU fine-tuning path" });
  acknowledgeNagFindings(stack);
  acknowledgeGpuNagFindings(gpu);
  Validations.of(app).addPlugins(new AwsSolutionsChecks(undefined, { verbose: true }));
  return { app, stack, gpu };
}

if (import.meta.main) {
  buildApp().app.synth();
}
