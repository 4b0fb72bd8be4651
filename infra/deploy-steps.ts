import { randomBytes } from "node:crypto";
import { DescribeStacksCommand } from "@aws-sdk/client-cloudformation";
import { GetSecretValueCommand, PutSecretValueCommand } from "@aws-sdk/client-secrets-manager";
import { GetServiceQuotaCommand } from "@aws-sdk/client-service-quotas";
import type { EdgetuneConfig } from "./config.ts";

/**
 * The steps of `npm run deploy` that talk to AWS, apart from the CDK itself, with their SDK clients
 * passed in (the tests fake them): the preflight a first-time account needs, and the Worker's secrets.
 */
export interface AwsClients {
  cloudformation: { send(command: DescribeStacksCommand): Promise<unknown> };
  quotas: { send(command: GetServiceQuotaCommand): Promise<{ Quota?: { Value?: number } }> };
  secrets: { send(command: GetSecretValueCommand | PutSecretValueCommand): Promise<{ SecretString?: string }> };
}

/** EC2 vCPU quotas for G and VT instances (the GPU hosts), by purchase option. */
export const GPU_QUOTAS = {
  spot: { code: "L-3819A6DF", name: "All G and VT Spot Instance Requests" },
  onDemand: { code: "L-DB2E81BA", name: "Running On-Demand G and VT instances" },
} as const;

export interface Preflight {
  /** What stops the deploy, each with what to do. */
  problems: string[];
  /** What the user should know. */
  notes: string[];
}

export async function preflight(clients: AwsClients, config: EdgetuneConfig, where: { account: string; region: string }): Promise<Preflight> {
  const problems: string[] = [];
  const notes: string[] = [];
  try {
    await clients.cloudformation.send(new DescribeStacksCommand({ StackName: "CDKToolkit" }));
  } catch (e) {
    const message = e instanceof Error ? e.message : String(e);
    // Only "does not exist" means not bootstrapped; anything else (no permission, throttling) is said as it is.
    problems.push(
      /does not exist/.test(message)
        ? `CDK is not bootstrapped in ${where.account}/${where.region} (no CDKToolkit stack): run  npx cdk bootstrap aws://${where.account}/${where.region}`
        : `Cannot check the CDK bootstrap stack in ${where.account}/${where.region}: ${message}`,
    );
  }
  const quota = async (code: string) =>
    (await clients.quotas.send(new GetServiceQuotaCommand({ ServiceCode: "ec2", QuotaCode: code })).catch(() => ({ Quota: undefined }))).Quota?.Value;
  const spot = config.spot ? await quota(GPU_QUOTAS.spot.code) : 0;
  const onDemand = await quota(GPU_QUOTAS.onDemand.code);
  const fits = (v: number | undefined) => v === undefined || v >= config.jobVcpus;
  const describe = (q: { code: string; name: string }, v: number | undefined) => `"${q.name}" (${q.code}) is ${v ?? "unknown"} vCPU`;
  const request = `request at least ${config.jobVcpus} vCPU in the Service Quotas console (EC2), in ${where.region}`;
  if (!fits(spot) && !fits(onDemand)) {
    // Not a blocker: head-only training (the default strategy) runs on the CPU queue (Fargate).
    notes.push(
      `No fine-tuning job can start yet: ${describe(GPU_QUOTAS.spot, spot)} and ${describe(GPU_QUOTAS.onDemand, onDemand)}, a GPU job needs ${config.jobVcpus}; ${request} (new accounts start at 0). Head-only training, the default, runs on the CPU queue meanwhile; a finetune run is cancelled after runnableTimeoutMinutes and reported.`,
    );
  } else if (config.spot && !fits(spot)) {
    notes.push(`${describe(GPU_QUOTAS.spot, spot)}: jobs will run on-demand only, at about 3× the price; ${request} for Spot.`);
  }
  notes.push("The edge worker needs the Workers Paid plan: one classification takes 10–35 ms of CPU, and the Free plan allows 10 ms per request.");
  return { problems, notes };
}

/**
 * The Worker's API keys: the stack generated them once and they stay across deploys. With `rotate`, a
 * new key is put in front and the previous one kept (clients move over until the next rotation drops it).
 */
export async function apiKeys(clients: AwsClients, secretArn: string, rotate: boolean): Promise<{ keys: string; created?: string }> {
  const current = (await clients.secrets.send(new GetSecretValueCommand({ SecretId: secretArn }))).SecretString ?? "";
  if (!rotate) return { keys: current };
  const created = randomBytes(30).toString("base64url").replace(/[-_]/g, "x");
  const keys = [created, current.split(",")[0]].filter(Boolean).join(",");
  await clients.secrets.send(new PutSecretValueCommand({ SecretId: secretArn, SecretString: keys }));
  return { keys, created };
}

/** The Worker's secrets, for one `wrangler secret bulk`. */
export async function workerSecrets(
  clients: AwsClients,
  outputs: Record<string, string>,
  rotate: boolean,
): Promise<{ secrets: Record<string, string>; created?: string }> {
  const { EdgeCredentialsSecretArn: credentialsArn, ApiKeysSecretArn: keysArn } = outputs;
  if (!credentialsArn || !keysArn) throw new Error("the stack outputs EdgeCredentialsSecretArn and ApiKeysSecretArn are missing: deploy the stack first");
  const key = JSON.parse((await clients.secrets.send(new GetSecretValueCommand({ SecretId: credentialsArn }))).SecretString ?? "{}") as {
    accessKeyId?: string;
    secretAccessKey?: string;
  };
  if (!key.accessKeyId || !key.secretAccessKey) throw new Error("the edge credentials secret is incomplete");
  const { keys, created } = await apiKeys(clients, keysArn, rotate);
  const secrets: Record<string, string> = { AWS_ACCESS_KEY_ID: key.accessKeyId, AWS_SECRET_ACCESS_KEY: key.secretAccessKey, API_KEYS: keys };
  // Stacks deployed before the console have no operator keys: the console's listings then stay off.
  const consoleArn = outputs.ConsoleKeysSecretArn;
  if (consoleArn) secrets.CONSOLE_API_KEYS = (await clients.secrets.send(new GetSecretValueCommand({ SecretId: consoleArn }))).SecretString ?? "";
  return { secrets, created };
}
