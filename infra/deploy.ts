#!/usr/bin/env node
/**
 * `npm run deploy`: the AWS stack, then the edge worker wired to it.
 *   0. preflight: CDK bootstrapped in this account and region, GPU quotas a job can run in, and what
 *      the Worker needs (infra/deploy-steps.ts); a problem stops here with the one command to run;
 *   1. cdk deploy (bucket, GPU Batch job, triggers, schedule, alerts, edge credentials, API keys);
 *   2. the Worker's secrets in one step (`wrangler secret bulk`): the edge's read-only key and the API
 *      keys, which the stack generated once and every later deploy keeps;
 *   3. `wrangler deploy` with the bucket and region.
 * Needs AWS credentials (any the AWS SDK finds) and a Cloudflare login (`wrangler login` or
 * CLOUDFLARE_API_TOKEN). `--rotate-api-key` puts a new API key in front of the current one (which
 * stays valid until the next rotation). `--dry-run` synthesizes and bundles without deploying anything.
 */
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { CloudFormationClient } from "@aws-sdk/client-cloudformation";
import { SecretsManagerClient } from "@aws-sdk/client-secrets-manager";
import { ServiceQuotasClient } from "@aws-sdk/client-service-quotas";
import { GetCallerIdentityCommand, STSClient } from "@aws-sdk/client-sts";
import { configFromContext } from "./config.ts";
import { type AwsClients, preflight, workerSecrets } from "./deploy-steps.ts";

const dryRun = process.argv.includes("--dry-run");
const rotate = process.argv.includes("--rotate-api-key");
const wranglerConfig = "functions/edge/wrangler.jsonc";

function run(cmd: string, args: string[], input?: string): void {
  process.stderr.write(`$ ${cmd} ${args.join(" ")}\n`);
  const r = spawnSync(cmd, args, { stdio: [input === undefined ? "inherit" : "pipe", "inherit", "inherit"], input });
  if (r.status !== 0) {
    process.stderr.write(`deploy: ${cmd} ${args[0]} failed (exit ${r.status})\n`);
    process.exit(r.status ?? 1);
  }
}

if (dryRun) {
  run("npx", ["cdk", "synth", "--quiet"]);
  run("npx", ["wrangler", "deploy", "--dry-run", "--config", wranglerConfig]);
  process.stderr.write("dry run: nothing was deployed\n");
  process.exit(0);
}

const config = configFromContext((JSON.parse(readFileSync("cdk.json", "utf8")) as { context?: { edgetune?: unknown } }).context?.edgetune);
const sts = new STSClient({});
const region = await sts.config.region();
const { Account: account = "?" } = await sts.send(new GetCallerIdentityCommand({}));
const clients: AwsClients = {
  cloudformation: new CloudFormationClient({ region }),
  quotas: new ServiceQuotasClient({ region }),
  secrets: new SecretsManagerClient({ region }),
};
const check = await preflight(clients, config, { account, region });
for (const note of check.notes) process.stderr.write(`note: ${note}\n`);
if (check.problems.length > 0) {
  for (const problem of check.problems) process.stderr.write(`deploy: ${problem}\n`);
  process.exit(1);
}

run("npx", ["cdk", "deploy", "Edgetune", "--require-approval", "broadening", "--outputs-file", "cdk.out/outputs.json"]);
const outputs = (JSON.parse(readFileSync("cdk.out/outputs.json", "utf8")) as Record<string, Record<string, string>>).Edgetune ?? {};
const { BucketName: bucket, ApiKeysSecretArn: keysArn } = outputs;
if (!bucket) throw new Error("the stack output BucketName is missing");
const { secrets, created } = await workerSecrets(clients, outputs, rotate);
run("npx", ["wrangler", "secret", "bulk", "--config", wranglerConfig], JSON.stringify(secrets));
run("npx", ["wrangler", "deploy", "--config", wranglerConfig, "--var", `S3_BUCKET:${bucket}`, "--var", `S3_REGION:${outputs.Region ?? region}`]);
if (created) process.stderr.write(`New API key (the previous one stays valid until the next rotation):\n  ${created}\n`);
process.stderr.write(`API keys: aws secretsmanager get-secret-value --secret-id ${keysArn} --query SecretString --output text\n`);
if (outputs.ConsoleKeysSecretArn)
  process.stderr.write(
    `Web console (the worker's URL, /), operator key: aws secretsmanager get-secret-value --secret-id ${outputs.ConsoleKeysSecretArn} --query SecretString --output text\n`,
  );
