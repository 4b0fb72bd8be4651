#!/usr/bin/env node
/**
 * The CDK app (`npx cdk synth`, `npm run deploy`). Settings come from the `edgetune` context key;
 * cdk-nag's AwsSolutions rules run as a validation plugin, so a violation fails synth.
 */
import { App, Validations } from "aws-cdk-lib";
import { AwsSolutionsChecks } from "cdk-nag";
import { configFromContext } from "./config.ts";
import { acknowledgeNagFindings } from "./nag.ts";
import { EdgetuneStack } from "./stack.ts";

export function buildApp(context: Record<string, unknown> = {}): { app: App; stack: EdgetuneStack } {
  const app = new App({ context });
  const config = configFromContext(app.node.tryGetContext("edgetune"));
  const stack = new EdgetuneStack(app, "Edgetune", {
    config,
    env: { account: process.env.CDK_DEFAULT_ACCOUNT, region: process.env.CDK_DEFAULT_REGION },
    description: "edgetune: transfer learning from S3 datasets to models served at the edge",
  });
  acknowledgeNagFindings(stack);
  Validations.of(app).addPlugins(new AwsSolutionsChecks(undefined, { verbose: true }));
  return { app, stack };
}

if (import.meta.main) {
  buildApp().app.synth();
}
