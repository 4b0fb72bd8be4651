#!/usr/bin/env node
import { readFileSync } from "node:fs";
/**
 * `npm run deploy`: preflight → core stack → edge worker → GPU stack (infra/deploy-pipeline.ts), each
 * step recorded in `.edgetune/deploy-state.json`, so a rerun after a failure continues where it stopped
 * (as long as the code, cdk.json and the flags are those of the failed deploy: else it starts over).
 *   0. preflight: CDK bootstrapped in this account and region, the G quotas, the alert e-mail (asked for,
 *      or `--alert-email`), the Cloudflare account (asked for when there are several); a problem stops
 *      here, before anything is deployed, with the one command to run;
 *   1. core: `cdk deploy Edgetune` (bucket, CPU Batch jobs, triggers, alerts, edge credentials, API keys);
 *   2. worker: its secrets from a file (`wrangler secret bulk`), the R2 bucket of its model cache, `wrangler deploy`;
 *   3. gpu: `cdk deploy EdgetuneGpu` (the fine-tuning path); a failure here leaves 1 and 2 serving; skipped
 *      (not failed) while cdk.json has no gpuBaseImage.
 * Needs AWS credentials (any the AWS SDK finds) and a Cloudflare login (`wrangler login` or
 * CLOUDFLARE_API_TOKEN). `--rotate-api-key` puts a new API key in front of the current one (which stays
 * valid until the next rotation); `--restart` redoes every step; `--dry-run` synthesizes and bundles
 * without deploying anything.
 */
import { createInterface } from "node:readline/promises";
import { CloudFormationClient } from "@aws-sdk/client-cloudformation";
import { SecretsManagerClient } from "@aws-sdk/client-secrets-manager";
import { ServiceQuotasClient } from "@aws-sdk/client-service-quotas";
import { GetCallerIdentityCommand, STSClient } from "@aws-sdk/client-sts";
import { codeVersion } from "./code-version.ts";
import { configFromContext } from "./config.ts";
import { deploy, spawnRunner } from "./deploy-pipeline.ts";

const argv = process.argv.slice(2);
const flag = (name: string) => argv.includes(name);
const value = (name: string) => {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : argv.find((a) => a.startsWith(`${name}=`))?.slice(name.length + 1);
};
const wranglerConfig = "functions/edge/wrangler.jsonc";
const tools = { cdk: ["npx", "cdk"], wrangler: ["npx", "wrangler"] };

if (flag("--dry-run")) {
  for (const command of [
    [...tools.cdk, "synth", "--quiet"],
    [...tools.wrangler, "deploy", "--dry-run", "--config", wranglerConfig],
  ]) {
    if (spawnRunner(command).status !== 0) process.exit(1);
  }
  process.stderr.write("dry run: nothing was deployed\n");
  process.exit(0);
}

const cdkContext = ((JSON.parse(readFileSync("cdk.json", "utf8")) as { context?: { edgetune?: Record<string, unknown> } }).context?.edgetune ?? {}) as Record<
  string,
  unknown
>;
const sts = new STSClient({});
const region = await sts.config.region();
const { Account: account = "?" } = await sts.send(new GetCallerIdentityCommand({}));
// A person at the terminal is asked; a script (no TTY) is told what to set instead.
const rl = process.stdin.isTTY ? createInterface({ input: process.stdin, output: process.stderr }) : undefined;
const outcome = await deploy(
  { rotate: flag("--rotate-api-key"), restart: flag("--restart"), alertEmail: value("--alert-email") },
  {
    aws: {
      cloudformation: new CloudFormationClient({ region }),
      quotas: new ServiceQuotasClient({ region }),
      secrets: new SecretsManagerClient({ region }),
    },
    where: { account, region },
    config: configFromContext(cdkContext),
    cdkContext,
    code: codeVersion(),
    tools,
    run: spawnRunner,
    stateDir: ".edgetune",
    wranglerConfig,
    env: process.env,
    ask: rl ? (question) => rl.question(question) : undefined,
    log: (line) => process.stderr.write(`${line}\n`),
  },
).finally(() => rl?.close());
process.exit(outcome.failed || outcome.problems ? 1 : 0);
