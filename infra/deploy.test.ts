import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type GetSecretValueCommand, PutSecretValueCommand } from "@aws-sdk/client-secrets-manager";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { fakeQuotas, UNREADABLE_NEW_ACCOUNT } from "../test/support/quotas.ts";
import { configFromContext } from "./config.ts";
import { type DeployDeps, deploy, spawnRunner } from "./deploy-pipeline.ts";
import { type AwsClients, GPU_QUOTAS, preflight, workerSecrets } from "./deploy-steps.ts";

/** AWS faked at the SDK boundary: a bootstrap stack or not, quotas by code, secrets by ARN. */
function fakeAws(options: { bootstrapped: boolean; quotas: Record<string, number | Error>; defaults?: Record<string, number> }) {
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
    quotas: fakeQuotas(options.quotas, options.defaults),
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

  it("falls back to AWS's default quota when the account's cannot be read, and never counts an unreadable quota as fitting", async () => {
    const fallback = fakeAws({ bootstrapped: true, quotas: UNREADABLE_NEW_ACCOUNT.account, defaults: UNREADABLE_NEW_ACCOUNT.defaults });
    const { notes } = await preflight(fallback.clients, config, where);
    expect(notes.join("\n")).toMatch(/No fine-tuning job can start yet: .*L-3819A6DF\) is 0 vCPU \(AWS's default: the account's own value could not be read\)/);
    const neither = fakeAws({ bootstrapped: true, quotas: UNREADABLE_NEW_ACCOUNT.account });
    const unknown = await preflight(neither.clients, config, where);
    expect(unknown.notes.join("\n")).toMatch(/The G-instance quotas could not be read: .*L-3819A6DF\) could not be read.*Fine-tuning jobs may not start/);
  });

  it("goes ahead with on-demand only, saying so, and always names the Workers Paid requirement", async () => {
    const { clients } = fakeAws({ bootstrapped: true, quotas: { [GPU_QUOTAS.spot.code]: 0, [GPU_QUOTAS.onDemand.code]: 8 } });
    const { problems, notes } = await preflight(clients, config, where);
    expect(problems).toEqual([]);
    expect(notes.join("\n")).toMatch(/Spot Instance Requests.*is 0 vCPU: GPU jobs will run on-demand only/);
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

/**
 * The deploy's steps against faked CDK and wrangler child processes (node scripts standing in for
 * `npx cdk` and `npx wrangler`, run as real processes by the deploy's own runner), AWS faked at the SDK.
 */
const FAKE_CDK = `
import { appendFileSync, writeFileSync } from "node:fs";
const args = process.argv.slice(2);
appendFileSync(process.env.FAKE_LOG, JSON.stringify({ tool: "cdk", args }) + "\\n");
if (process.env.FAKE_CDK_FAIL && args.includes(process.env.FAKE_CDK_FAIL)) {
  console.error("ERROR: failed to build asset: docker build exited with 1 (the GPU image)");
  process.exit(1);
}
const out = args.indexOf("--outputs-file");
if (out >= 0) writeFileSync(args[out + 1], JSON.stringify({ Edgetune: { BucketName: "edgetune-data-1", Region: "eu-west-1",
  EdgeCredentialsSecretArn: "arn:creds", ApiKeysSecretArn: "arn:keys", ConsoleKeysSecretArn: "arn:console" } }));
`;
const FAKE_WRANGLER = `
import { appendFileSync, readFileSync, statSync } from "node:fs";
const args = process.argv.slice(2);
const entry = { tool: "wrangler", args, account: process.env.CLOUDFLARE_ACCOUNT_ID ?? null, stdinIsPipe: !process.stdin.isTTY && statSync("/dev/stdin").isFIFO() };
if (args[0] === "whoami") {
  console.log(JSON.stringify({ loggedIn: true, accounts: [{ name: "Personal", id: "a".repeat(32) }, { name: "Team", id: "b".repeat(32) }] }));
} else if (args[0] === "secret" && args[1] === "bulk") {
  entry.file = { path: args[2], mode: (statSync(args[2]).mode & 0o777).toString(8), secrets: JSON.parse(readFileSync(args[2], "utf8")) };
} else if (args[0] === "r2" && process.env.FAKE_R2_EXISTS) {
  console.error("The bucket you tried to create already exists, and you own it. [code: 10004]");
  appendFileSync(process.env.FAKE_LOG, JSON.stringify(entry) + "\\n");
  process.exit(1);
}
appendFileSync(process.env.FAKE_LOG, JSON.stringify(entry) + "\\n");
`;

describe("npm run deploy, step by step", () => {
  let dir: string;
  let log: string;
  let lines: string[];
  const saved = { ...process.env };
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), "edgetune-deploy-"));
    log = join(dir, "calls.jsonl");
    writeFileSync(join(dir, "cdk.mjs"), FAKE_CDK);
    writeFileSync(join(dir, "wrangler.mjs"), FAKE_WRANGLER);
    writeFileSync(join(dir, "wrangler.jsonc"), '{ "name": "edgetune-edge" }');
    process.env.FAKE_LOG = log;
    delete process.env.CLOUDFLARE_ACCOUNT_ID;
    lines = [];
  });
  afterEach(() => {
    process.env = { ...saved };
  });
  const calls = () =>
    existsSync(log)
      ? readFileSync(log, "utf8")
          .trim()
          .split("\n")
          .map(
            (l) =>
              JSON.parse(l) as {
                tool: string;
                args: string[];
                account: string | null;
                stdinIsPipe: boolean;
                file?: { path: string; mode: string; secrets: Record<string, string> };
              },
          )
      : [];
  // Each call as its command words: "cdk deploy Edgetune", "wrangler secret bulk", "wrangler r2 bucket create"…
  const words: Record<string, number> = { r2: 3, secret: 2, deploy: 1, whoami: 2 };
  const deployed = () => calls().map((c) => `${c.tool} ${c.args.slice(0, c.tool === "cdk" ? 2 : (words[c.args[0] as string] ?? 1)).join(" ")}`);
  const digest = `nvidia/cuda:11.2.2-cudnn8-runtime-ubuntu20.04@sha256:${"ab".repeat(32)}`;
  function deps(overrides: Partial<DeployDeps> = {}, context: Record<string, unknown> = { gpuBaseImage: digest }): DeployDeps {
    const { clients } = fakeAws({ bootstrapped: true, quotas: { [GPU_QUOTAS.spot.code]: 8, [GPU_QUOTAS.onDemand.code]: 8 } });
    return {
      aws: clients,
      where,
      config: configFromContext(context),
      cdkContext: context,
      code: "commit-1",
      tools: { cdk: [process.execPath, join(dir, "cdk.mjs")], wrangler: [process.execPath, join(dir, "wrangler.mjs")] },
      run: spawnRunner,
      stateDir: join(dir, ".edgetune"),
      wranglerConfig: join(dir, "wrangler.jsonc"),
      env: { CLOUDFLARE_ACCOUNT_ID: "c".repeat(32) },
      log: (line) => lines.push(line),
      ...overrides,
    };
  }
  const options = { rotate: false, restart: false, alertEmail: "ops@example.com" };

  it("a failing GPU step leaves the core and the worker deployed, says what failed and how to retry; the rerun continues at the GPU step", async () => {
    process.env.FAKE_CDK_FAIL = "EdgetuneGpu";
    const first = await deploy(options, deps());
    expect(first.failed).toMatchObject({ step: "gpu", message: "cdk deploy EdgetuneGpu failed (exit 1)", retry: "npm run deploy" });
    expect(first.completed).toEqual(["core", "worker"]);
    expect(deployed()).toEqual(["cdk deploy Edgetune", "wrangler secret bulk", "wrangler r2 bucket create", "wrangler deploy", "cdk deploy EdgetuneGpu"]);
    // The core went alone (--exclusively), the worker got the core's bucket.
    expect(calls()[0]?.args).toEqual(expect.arrayContaining(["--exclusively", "--outputs-file"]));
    expect(calls()[3]?.args).toEqual(expect.arrayContaining(["S3_BUCKET:edgetune-data-1", "S3_REGION:eu-west-1"]));
    expect(lines.join("\n")).toMatch(
      /the gpu step failed: cdk deploy EdgetuneGpu failed \(exit 1\)\nDeployed and working: core, worker \(head training\)\.\nFix it, then run {2}npm run deploy {2}— it continues at the gpu step/,
    );

    delete process.env.FAKE_CDK_FAIL;
    writeFileSync(log, "");
    const rerun = await deploy(options, deps());
    expect(rerun).toEqual({ completed: ["core", "worker", "gpu"] });
    expect(deployed()).toEqual(["cdk deploy EdgetuneGpu"]); // nothing deployed twice
    // Everything done: the next deploy deploys every step again.
    writeFileSync(log, "");
    await deploy(options, deps());
    expect(deployed()).toEqual(["cdk deploy Edgetune", "wrangler secret bulk", "wrangler r2 bucket create", "wrangler deploy", "cdk deploy EdgetuneGpu"]);
  });

  it("without a pinned CUDA base, the GPU step is skipped (not failed) with how to enable it; the next deploy deploys core and worker again", async () => {
    const r = await deploy(options, deps({}, {}));
    expect(lines.join("\n")).toMatch(/note: cdk\.json sets no gpuBaseImage: the GPU step will be skipped\./);
    expect(r.failed).toBeUndefined();
    expect(r.completed).toEqual(["core", "worker"]);
    expect(r.skipped?.[0]?.step).toBe("gpu");
    expect(r.skipped?.[0]?.reason).toMatch(
      /pinned by digest.*gpuBaseImage.*docker pull nvidia\/cuda:11\.2\.2-cudnn8-runtime-ubuntu20\.04.*Head-only training works without it/,
    );
    expect(deployed()).not.toContain("cdk deploy EdgetuneGpu");
    // Nothing is left "done": a later deploy (new code, same everything else) deploys core and worker again.
    writeFileSync(log, "");
    await deploy(options, deps({}, {}));
    expect(deployed()).toEqual(["cdk deploy Edgetune", "wrangler secret bulk", "wrangler r2 bucket create", "wrangler deploy"]);
  });

  it("continues a failed deploy only for the same code, cdk.json, e-mail and flags: any change deploys every step again", async () => {
    const failGpu = async (opts: typeof options, d: DeployDeps) => {
      process.env.FAKE_CDK_FAIL = "EdgetuneGpu";
      writeFileSync(log, "");
      const r = await deploy(opts, d);
      expect(r.failed?.step).toBe("gpu");
      return r;
    };
    await failGpu(options, deps());
    // New code (a commit, or an uncommitted edit): core and worker are deployed again, not skipped as "done before".
    await failGpu(options, deps({ code: "commit-2" }));
    expect(deployed()).toEqual(["cdk deploy Edgetune", "wrangler secret bulk", "wrangler r2 bucket create", "wrangler deploy", "cdk deploy EdgetuneGpu"]);
    expect(lines.join("\n")).toMatch(/changed since core, worker were deployed: every step runs again/);
    // Same code and flags: only the failed step.
    await failGpu(options, deps({ code: "commit-2" }));
    expect(deployed()).toEqual(["cdk deploy EdgetuneGpu"]);
    // --rotate-api-key reaches the worker (a new key is put in front), once.
    const rotated = await failGpu({ ...options, rotate: true }, deps({ code: "commit-2" }));
    expect(deployed()).toContain("wrangler secret bulk");
    expect(lines.join("\n")).toMatch(/New API key/);
    expect(rotated.completed).toEqual(["core", "worker"]);
    // A changed cdk.json: the core gets the new context.
    const context = { gpuBaseImage: digest, cpuMaxVcpus: 16 };
    await failGpu({ ...options, rotate: true }, deps({ code: "commit-2" }, context));
    expect(calls()[0]?.args.join(" ")).toContain('"cpuMaxVcpus":16');
    // Another alert e-mail: the core is deployed with it, not only said in the log.
    await failGpu({ ...options, rotate: true, alertEmail: "new@example.com" }, deps({ code: "commit-2" }, context));
    expect(calls()[0]?.args.join(" ")).toContain('"alarmEmail":"new@example.com"');
    // Unknown code (not a git checkout): nothing is skipped on a guess.
    await failGpu(options, deps({ code: undefined }));
    await failGpu(options, deps({ code: undefined }));
    expect(deployed()[0]).toBe("cdk deploy Edgetune");
  });

  it("cdk.json's alarmEmail wins over the e-mail remembered from an earlier deploy", async () => {
    await deploy({ ...options, alertEmail: "old@example.com" }, deps());
    writeFileSync(log, "");
    await deploy({ ...options, alertEmail: undefined }, deps({}, { gpuBaseImage: digest, alarmEmail: "changed@example.com" }));
    expect(calls()[0]?.args.join(" ")).toContain('"alarmEmail":"changed@example.com"');
    expect(lines.at(-1)).toBe("Deployed: core, worker, gpu.");
    expect(lines.join("\n")).toMatch(/e-mailed to changed@example\.com/);
    // Without one in cdk.json or on the command line, the last one used is kept.
    writeFileSync(log, "");
    await deploy({ ...options, alertEmail: undefined }, deps());
    expect(calls()[0]?.args.join(" ")).toContain('"alarmEmail":"changed@example.com"');
  });

  it("with two Cloudflare accounts: refuses before deploying anything when nobody can be asked, with the list; asks when someone can", async () => {
    const refused = await deploy(options, deps({ env: {} }));
    expect(refused.completed).toEqual([]);
    expect(refused.problems?.join("\n")).toMatch(
      /2 accounts; say which one .* CLOUDFLARE_ACCOUNT_ID=<id> npm run deploy:\n {2}1\. Personal {2}a{32}\n {2}2\. Team {2}b{32}/,
    );
    expect(deployed()).toEqual(["wrangler whoami --json"]); // no cdk, no worker
    writeFileSync(log, "");

    const questions: string[] = [];
    const asked = await deploy(
      options,
      deps({
        env: {},
        ask: async (q) => {
          questions.push(q);
          return "2";
        },
      }),
    );
    expect(asked.completed).toEqual(["core", "worker", "gpu"]);
    expect(questions.join("\n")).toMatch(/Which Cloudflare account.*\n {2}1\. Personal.*\n {2}2\. Team/);
    // Every wrangler call after the choice goes to the chosen account; the secrets come from a 0600 file, not stdin.
    const wrangler = calls().filter((c) => c.tool === "wrangler" && c.args[0] !== "whoami");
    expect(wrangler.map((c) => c.account)).toEqual(["b".repeat(32), "b".repeat(32), "b".repeat(32)]);
    const bulk = wrangler.find((c) => c.args[1] === "bulk");
    expect(bulk?.file).toMatchObject({ mode: "600", secrets: { AWS_ACCESS_KEY_ID: "AKIAEDGE", API_KEYS: "GeneratedOnceByCloudFormation0123456789ab" } });
    expect(bulk?.stdinIsPipe).toBe(false);
    expect(existsSync(bulk?.file?.path as string)).toBe(false); // removed afterwards
    // The choice is remembered: the next deploy asks nothing.
    writeFileSync(log, "");
    await deploy(options, deps({ env: {} }));
    expect(calls().find((c) => c.tool === "wrangler" && c.args[0] === "deploy")?.account).toBe("b".repeat(32));
  });

  it("asks for an alert e-mail and passes it to the core; says plainly when there is none; an existing R2 bucket is fine", async () => {
    process.env.FAKE_R2_EXISTS = "1";
    const none = await deploy({ ...options, alertEmail: undefined }, deps());
    expect(none.completed).toEqual(["core", "worker", "gpu"]);
    expect(lines.join("\n")).toMatch(/NO alert e-mail\. .*nobody will be told\. Set one with {2}npm run deploy -- --alert-email/);
    expect(calls()[0]?.args.join(" ")).not.toContain("alarmEmail");
    writeFileSync(log, "");
    const asked = await deploy({ ...options, alertEmail: undefined }, deps({ ask: async () => "me@example.com" }));
    expect(asked.completed).toEqual(["core", "worker", "gpu"]);
    const context = calls()[0]?.args.find((a) => a.startsWith("edgetune="));
    expect(JSON.parse(context?.slice("edgetune=".length) as string)).toEqual({ gpuBaseImage: digest, alarmEmail: "me@example.com" });
    const bad = await deploy({ ...options, alertEmail: "not-an-address", restart: true }, deps());
    expect(bad.problems).toEqual(['"not-an-address" is not an e-mail address (--alert-email).']);
  });
});

describe("the worker's secrets file", () => {
  it("is removed when the deploy is interrupted (Ctrl-C) while wrangler reads it, and the deploy still dies of the signal", async () => {
    const dir = mkdtempSync(join(tmpdir(), "edgetune-interrupt-"));
    const reported = join(dir, "secrets-path");
    // wrangler that reports the secrets file it was given, then hangs until interrupted.
    writeFileSync(
      join(dir, "wrangler.mjs"),
      `import { writeFileSync } from "node:fs"; writeFileSync(process.env.REPORT, process.argv[4]); setInterval(() => {}, 1000);`,
    );
    // The deploy's secret step, in a process of its own (a signal to this test's process would end the test run).
    const script = join(dir, "put.ts");
    writeFileSync(
      script,
      `import { putSecrets } from ${JSON.stringify(join(import.meta.dirname, "cloudflare.ts"))};
import { spawnRunnerAsync } from ${JSON.stringify(join(import.meta.dirname, "deploy-pipeline.ts"))};
await putSecrets((args, env) => spawnRunnerAsync([process.execPath, ${JSON.stringify(join(dir, "wrangler.mjs"))}, ...args], { env }), { API_KEYS: "k" }, [], {});`,
    );
    const { spawn } = await import("node:child_process");
    // detached: a process group of its own, as a terminal's foreground job is; Ctrl-C signals the whole group.
    const child = spawn(process.execPath, [script], { env: { ...process.env, REPORT: reported }, detached: true, stdio: "ignore" });
    const exited = new Promise<NodeJS.Signals | number | null>((resolve) => child.on("exit", (code, signal) => resolve(signal ?? code)));
    for (let i = 0; i < 200 && !existsSync(reported); i++) await new Promise((r) => setTimeout(r, 50));
    const secretsFile = readFileSync(reported, "utf8");
    expect(existsSync(secretsFile)).toBe(true);
    process.kill(-(child.pid as number), "SIGINT");
    expect(await exited).toBe("SIGINT");
    expect(existsSync(join(secretsFile, ".."))).toBe(false);
  }, 20_000);
});
