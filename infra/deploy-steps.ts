import { randomBytes } from "node:crypto";
import { DescribeStacksCommand } from "@aws-sdk/client-cloudformation";
import { GetSecretValueCommand, PutSecretValueCommand } from "@aws-sdk/client-secrets-manager";
import { describeQuota, GPU_QUOTAS, gpuJobFits, type QuotaClient, quotaRequest, readGpuQuotas } from "../jobs/train/src/gpu-quota.ts";
import type { EdgetuneConfig } from "./config.ts";

export { GPU_QUOTAS };

/**
 * The steps of `npm run deploy` that talk to AWS, apart from the CDK itself, with their SDK clients
 * passed in (the tests fake them): the preflight a first-time account needs, and the Worker's secrets.
 */
export interface AwsClients {
  cloudformation: { send(command: DescribeStacksCommand): Promise<unknown> };
  quotas: QuotaClient;
  secrets: { send(command: GetSecretValueCommand | PutSecretValueCommand): Promise<{ SecretString?: string }> };
}

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
  // The account's quota, else AWS's default for it; unknown only when neither can be read, and then said.
  const quotas = await readGpuQuotas(clients.quotas, config.spot);
  const fits = gpuJobFits(quotas, config.jobVcpus);
  const described = `${describeQuota("spot", quotas.spot)} and ${describeQuota("onDemand", quotas.onDemand)}`;
  if (fits === false) {
    // Not a blocker: head-only training (the default strategy) runs on the CPU queue (Fargate).
    notes.push(
      `No fine-tuning job can start yet: ${described}, a GPU job needs ${config.jobVcpus}; ${quotaRequest(config.jobVcpus, where.region)} (new accounts start at 0). Head-only training, the default, runs on the CPU queue meanwhile; a finetune run is refused at once with this reason.`,
    );
  } else if (fits === undefined) {
    notes.push(
      `The G-instance quotas could not be read: ${described}. Fine-tuning jobs may not start; check them in the Service Quotas console (EC2), in ${where.region}.`,
    );
  } else if (config.spot && (quotas.spot.value ?? 0) < config.jobVcpus) {
    notes.push(
      `${describeQuota("spot", quotas.spot)}: GPU jobs will run on-demand only, at about 3× the price; ${quotaRequest(config.jobVcpus, where.region)} for Spot.`,
    );
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
