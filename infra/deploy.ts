#!/usr/bin/env node
/**
 * `npm run deploy`: the AWS stack, then the edge worker wired to it.
 *   1. cdk deploy (bucket, GPU Batch job, triggers, schedule, alerts, edge credentials);
 *   2. read the stack outputs and the edge's read-only key from Secrets Manager;
 *   3. put the Worker secrets (AWS key, API keys) and `wrangler deploy` with the bucket and region.
 * Needs AWS credentials (any the AWS SDK finds) and a Cloudflare login (`wrangler login` or
 * CLOUDFLARE_API_TOKEN). API keys: EDGETUNE_API_KEYS, or one is generated and printed once.
 * `npm run deploy -- --dry-run` synthesizes and bundles without deploying anything.
 */
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { GetSecretValueCommand, SecretsManagerClient } from "@aws-sdk/client-secrets-manager";

const dryRun = process.argv.includes("--dry-run");
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

run("npx", ["cdk", "deploy", "Edgetune", "--require-approval", "broadening", "--outputs-file", "cdk.out/outputs.json"]);
const outputs = (JSON.parse(readFileSync("cdk.out/outputs.json", "utf8")) as Record<string, Record<string, string>>).Edgetune ?? {};
const { BucketName: bucket, Region: region, EdgeCredentialsSecretArn: secretArn } = outputs;
if (!bucket || !region || !secretArn) throw new Error("stack outputs BucketName, Region, EdgeCredentialsSecretArn are missing");

const secret = await new SecretsManagerClient({ region }).send(new GetSecretValueCommand({ SecretId: secretArn }));
const key = JSON.parse(secret.SecretString ?? "{}") as { accessKeyId?: string; secretAccessKey?: string };
if (!key.accessKeyId || !key.secretAccessKey) throw new Error("the edge credentials secret is incomplete");

let apiKeys = process.env.EDGETUNE_API_KEYS;
if (!apiKeys) {
  apiKeys = randomBytes(24).toString("base64url");
  process.stderr.write(`Generated an API key (shown once; set EDGETUNE_API_KEYS to choose your own):\n  ${apiKeys}\n`);
}
for (const [name, value] of [
  ["AWS_ACCESS_KEY_ID", key.accessKeyId],
  ["AWS_SECRET_ACCESS_KEY", key.secretAccessKey],
  ["API_KEYS", apiKeys],
] as const) {
  run("npx", ["wrangler", "secret", "put", name, "--config", wranglerConfig], value);
}
run("npx", ["wrangler", "deploy", "--config", wranglerConfig, "--var", `S3_BUCKET:${bucket}`, "--var", `S3_REGION:${region}`]);
