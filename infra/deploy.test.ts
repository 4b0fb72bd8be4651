import { type GetSecretValueCommand, PutSecretValueCommand } from "@aws-sdk/client-secrets-manager";
import type { GetServiceQuotaCommand } from "@aws-sdk/client-service-quotas";
import { describe, expect, it } from "vitest";
import { configFromContext } from "./config.ts";
import { type AwsClients, GPU_QUOTAS, preflight, workerSecrets } from "./deploy-steps.ts";

/** AWS faked at the SDK boundary: a bootstrap stack or not, quotas by code, secrets by ARN. */
function fakeAws(options: { bootstrapped: boolean; quotas: Record<string, number> }) {
  const secrets = new Map<string, string>([
    ["arn:creds", JSON.stringify({ accessKeyId: "AKIAEDGE", secretAccessKey: "edge-secret" })],
    ["arn:keys", "GeneratedOnceByCloudFormation0123456789ab"],
    ["arn:console", "OperatorKeyGeneratedOnce0123456789abcdef"],
  ]);
  const clients: AwsClients = {
    cloudformation: {
      async send() {
        if (!options.bootstrapped) throw new Error("Stack with id CDKToolkit does not exist");
        return {};
      },
    },
    quotas: {
      async send(command: GetServiceQuotaCommand) {
        return { Quota: { Value: options.quotas[command.input.QuotaCode as string] } };
      },
    },
    secrets: {
      async send(command: GetSecretValueCommand | PutSecretValueCommand) {
        if (command instanceof PutSecretValueCommand) {
          secrets.set(command.input.SecretId as string, command.input.SecretString as string);
          return {};
        }
        return { SecretString: secrets.get(command.input.SecretId as string) };
      },
    },
  };
  return { clients, secrets };
}

const config = configFromContext({});
const where = { account: "123456789012", region: "eu-west-1" };
const outputs = { EdgeCredentialsSecretArn: "arn:creds", ApiKeysSecretArn: "arn:keys", ConsoleKeysSecretArn: "arn:console" };

describe("deploy preflight", () => {
  it("stops a first deploy on an account that is not bootstrapped, with the one command to run", async () => {
    const { clients } = fakeAws({ bootstrapped: false, quotas: { [GPU_QUOTAS.spot.code]: 8, [GPU_QUOTAS.onDemand.code]: 8 } });
    const { problems } = await preflight(clients, config, where);
    expect(problems).toEqual(["CDK is not bootstrapped in 123456789012/eu-west-1 (no CDKToolkit stack): run  npx cdk bootstrap aws://123456789012/eu-west-1"]);
  });

  it("says what went wrong when the bootstrap check itself fails, instead of advising a bootstrap", async () => {
    const { clients } = fakeAws({ bootstrapped: true, quotas: { [GPU_QUOTAS.spot.code]: 8, [GPU_QUOTAS.onDemand.code]: 8 } });
    clients.cloudformation.send = async () => {
      throw new Error("User is not authorized to perform: cloudformation:DescribeStacks");
    };
    const { problems } = await preflight(clients, config, where);
    expect(problems).toEqual([
      "Cannot check the CDK bootstrap stack in 123456789012/eu-west-1: User is not authorized to perform: cloudformation:DescribeStacks",
    ]);
  });

  it("goes ahead on a new account whose G quotas are 0 (head training runs on CPU), naming both quotas for fine-tuning", async () => {
    const { clients } = fakeAws({ bootstrapped: true, quotas: { [GPU_QUOTAS.spot.code]: 0, [GPU_QUOTAS.onDemand.code]: 0 } });
    const { problems, notes } = await preflight(clients, config, where);
    expect(problems).toEqual([]);
    expect(notes.join("\n")).toMatch(
      /No fine-tuning job can start yet: "All G and VT Spot Instance Requests" \(L-3819A6DF\) is 0 vCPU and "Running On-Demand G and VT instances" \(L-DB2E81BA\) is 0 vCPU, a GPU job needs 4.*Head-only training, the default, runs on the CPU queue/,
    );
  });

  it("goes ahead with on-demand only, saying so, and always names the Workers Paid requirement", async () => {
    const { clients } = fakeAws({ bootstrapped: true, quotas: { [GPU_QUOTAS.spot.code]: 0, [GPU_QUOTAS.onDemand.code]: 8 } });
    const { problems, notes } = await preflight(clients, config, where);
    expect(problems).toEqual([]);
    expect(notes.join("\n")).toMatch(/Spot Instance Requests.*is 0 vCPU: jobs will run on-demand only/);
    expect(notes.join("\n")).toMatch(/Workers Paid plan/);
  });
});

describe("worker secrets", () => {
  it("keep the API key across deploys, and rotate only when asked, keeping the previous key once", async () => {
    const { clients, secrets } = fakeAws({ bootstrapped: true, quotas: {} });
    const first = await workerSecrets(clients, outputs, false);
    const second = await workerSecrets(clients, outputs, false);
    expect(first.secrets).toEqual({
      AWS_ACCESS_KEY_ID: "AKIAEDGE",
      AWS_SECRET_ACCESS_KEY: "edge-secret",
      API_KEYS: "GeneratedOnceByCloudFormation0123456789ab",
      CONSOLE_API_KEYS: "OperatorKeyGeneratedOnce0123456789abcdef",
    });
    // A stack from before the console: no operator keys, the console's listings stay off.
    const { ConsoleKeysSecretArn: _none, ...older } = outputs;
    expect((await workerSecrets(clients, older, false)).secrets).not.toHaveProperty("CONSOLE_API_KEYS");
    expect(second.secrets.API_KEYS).toBe(first.secrets.API_KEYS);
    expect(second.created).toBeUndefined();

    const rotated = await workerSecrets(clients, outputs, true);
    expect(rotated.created).toMatch(/^[A-Za-z0-9]{40}$/);
    expect(rotated.secrets.API_KEYS).toBe(`${rotated.created},GeneratedOnceByCloudFormation0123456789ab`);
    expect(secrets.get("arn:keys")).toBe(rotated.secrets.API_KEYS);
    const again = await workerSecrets(clients, outputs, true);
    expect(again.secrets.API_KEYS).toBe(`${again.created},${rotated.created}`); // the oldest key is dropped
  });
});
