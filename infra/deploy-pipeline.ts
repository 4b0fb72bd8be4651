import { spawn, spawnSync } from "node:child_process";
import { createHash, randomUUID } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { z } from "zod";
import { EdgetuneError, userMessage } from "#shared/errors.ts";
import { chooseAccount, putSecrets, type Wrangler } from "./cloudflare.ts";
import type { EdgetuneConfig } from "./config.ts";
import { type AwsClients, preflight, workerSecrets } from "./deploy-steps.ts";
import { STACKS } from "./stack-names.ts";

/**
 * `npm run deploy` as independent steps, each leaving a working service: preflight → core (AWS: bucket,
 * head training, triggers, alerts, the edge's credentials) → worker (Cloudflare) → GPU (the fine-tuning
 * stack, whose CUDA image is the fragile build). A failed step stops the deploy with what failed and the
 * command that retries it; what was deployed before it keeps working.
 *
 * Resumable through a state file (`.edgetune/deploy-state.json`), not derived from CloudFormation stack
 * status: the worker step has no stack, and a stack in UPDATE_COMPLETE says that *some* deploy finished,
 * not that this one did — nor that its outputs reached the worker. The file records the steps this deploy
 * completed, so a rerun after a fix continues at the failed step (`--restart` redoes them all); once every
 * step has succeeded the list is cleared, and the next `npm run deploy` deploys everything again. The list
 * holds only for the deploy that wrote it: it is kept with a fingerprint of what was deployed (the code,
 * the cdk.json context, the alert e-mail, the Cloudflare account, --rotate-api-key), and any change there
 * starts over — else a code change or a new flag would be skipped along with the steps "done before". It also
 * remembers the choices the preflight asked for (alert e-mail, Cloudflare account) per AWS account and region;
 * cdk.json's alarmEmail and --alert-email win over the remembered one.
 */
export const STEPS = ["core", "worker", "gpu"] as const;
export type Step = (typeof STEPS)[number];

const stateSchema = z.object({
  account: z.string(),
  region: z.string(),
  done: z.array(z.enum(STEPS)).default([]),
  /** What the steps in `done` deployed (deployFingerprint); another fingerprint makes them count for nothing. */
  fingerprint: z.string().optional(),
  failed: z.object({ step: z.enum(STEPS), message: z.string(), at: z.string() }).optional(),
  alertEmail: z.string().optional(),
  cloudflareAccountId: z.string().optional(),
});
export type DeployState = z.output<typeof stateSchema>;

/** Runs a command line; `capture` keeps its output (else it goes to the terminal). stdin is always the terminal's. */
export type Runner = (
  command: string[],
  options?: { env?: Record<string, string>; capture?: boolean },
) => { status: number | null; stdout: string; stderr: string };

export const spawnRunner: Runner = (command, options = {}) => {
  const [cmd, ...args] = command as [string, ...string[]];
  process.stderr.write(`$ ${command.join(" ")}\n`);
  const r = spawnSync(cmd, args, {
    env: { ...process.env, ...options.env },
    stdio: ["inherit", options.capture ? "pipe" : "inherit", options.capture ? "pipe" : "inherit"],
    encoding: "utf8",
  });
  return { status: r.status, stdout: r.stdout ?? "", stderr: r.stderr ?? "" };
};

/** `spawnRunner` without blocking the event loop, output captured: for a step whose signals must reach our handlers (putSecrets). */
export const spawnRunnerAsync = (command: string[], options: { env?: Record<string, string> } = {}): Promise<ReturnType<Runner>> => {
  const [cmd, ...args] = command as [string, ...string[]];
  process.stderr.write(`$ ${command.join(" ")}\n`);
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { env: { ...process.env, ...options.env }, stdio: ["inherit", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => {
      stdout += d.toString();
    });
    child.stderr.on("data", (d: Buffer) => {
      stderr += d.toString();
    });
    child.on("error", (e) => resolve({ status: null, stdout, stderr: `${stderr}${e.message}` }));
    child.on("close", (status) => resolve({ status, stdout, stderr }));
  });
};

export interface DeployOptions {
  rotate: boolean;
  restart: boolean;
  alertEmail?: string;
}

export interface DeployDeps {
  aws: AwsClients;
  where: { account: string; region: string };
  config: EdgetuneConfig;
  /** The `edgetune` context from cdk.json, passed back to cdk with the alert e-mail set. */
  cdkContext: Record<string, unknown>;
  /** The code being deployed (codeVersion: git HEAD and uncommitted changes); undefined when unknown, and then no step is skipped. */
  code: string | undefined;
  tools: { cdk: string[]; wrangler: string[] };
  run: Runner;
  /** `.edgetune/`: the state file and the stacks' outputs. */
  stateDir: string;
  wranglerConfig: string;
  env: Record<string, string | undefined>;
  /** Asks a person; undefined when nobody is at the terminal (CI, a pipe). */
  ask?: (question: string) => Promise<string>;
  log: (line: string) => void;
}

export interface DeployOutcome {
  completed: Step[];
  /** Steps left out on purpose (the GPU stack without its pinned CUDA base), with how to enable them. */
  skipped?: { step: Step; reason: string }[];
  failed?: { step: Step; message: string; retry: string };
  /** The preflight's blocking problems: nothing was deployed. */
  problems?: string[];
}

/** The R2 bucket the worker's MODEL_CACHE binding reads (functions/edge/wrangler.jsonc). */
export const MODEL_CACHE_BUCKET = "edgetune-model-cache";

/** A step that failed, with what failed in words (the deploy prints it with the retry command). */
export class StepFailed extends EdgetuneError {
  constructor(message: string) {
    super("deploy_step_failed", message);
  }
}

export async function deploy(options: DeployOptions, deps: DeployDeps): Promise<DeployOutcome> {
  const { log } = deps;
  const statePath = join(deps.stateDir, "deploy-state.json");
  mkdirSync(deps.stateDir, { recursive: true });
  const previous = existsSync(statePath) ? stateSchema.safeParse(JSON.parse(readFileSync(statePath, "utf8"))) : undefined;
  const same = previous?.success && previous.data.account === deps.where.account && previous.data.region === deps.where.region;
  const state: DeployState = same ? previous.data : { account: deps.where.account, region: deps.where.region, done: [] };
  if (options.restart) state.done = [];
  const save = () => writeFileSync(statePath, `${JSON.stringify(state, null, 2)}\n`);

  // 0. Preflight: everything that can stop a deploy is found before anything is deployed.
  const check = await preflight(deps.aws, deps.config, deps.where);
  const problems = [...check.problems];
  // The flag, then cdk.json (a changed alarmEmail there is meant), then the one given to an earlier deploy.
  const email = options.alertEmail ?? deps.config.alarmEmail ?? state.alertEmail ?? (await askEmail(deps));
  if (email !== undefined && !z.email().safeParse(email).success) problems.push(`"${email}" is not an e-mail address (--alert-email).`);
  const wrangler: Wrangler = (args, env) => deps.run([...deps.tools.wrangler, ...args], { env, capture: true });
  const account = await chooseAccount({
    env: deps.env,
    wranglerConfig: deps.wranglerConfig,
    remembered: state.cloudflareAccountId,
    wrangler,
    ask: deps.ask,
  }).catch((e: unknown) => {
    problems.push(userMessage(e));
    return undefined;
  });
  if (!deps.config.gpuBaseImage) check.notes.push(`cdk.json sets no gpuBaseImage: the GPU step will be skipped. ${GPU_BASE_HOWTO}`);
  for (const note of check.notes) log(`note: ${note}`);
  if (problems.length > 0 || !account) {
    for (const p of problems) log(`deploy: ${p}`);
    return { completed: [], problems };
  }
  if (email) log(`Alerts (failed jobs, undelivered triggers) are e-mailed to ${email}: confirm the subscription in the first e-mail AWS sends.`);
  else
    log(
      "note: NO alert e-mail. Failed jobs and undelivered triggers are published to the alerts topic, but nobody is subscribed to it: nobody will be told. Set one with  npm run deploy -- --alert-email you@example.com",
    );
  log(`Cloudflare account: ${account.name ? `${account.name} ` : ""}${account.id} (${account.from}).`);
  state.alertEmail = email;
  state.cloudflareAccountId = account.id;
  const fingerprint = deployFingerprint({ code: deps.code, context: deps.cdkContext, email, cloudflareAccountId: account.id, rotate: options.rotate });
  if (state.done.length > 0 && fingerprint !== state.fingerprint) {
    log(
      deps.code === undefined
        ? `The code's version is unknown (not a git checkout): ${state.done.join(", ")}, done before, are deployed again.`
        : `The code, cdk.json, the alert e-mail, the Cloudflare account or --rotate-api-key changed since ${state.done.join(", ")} were deployed: every step runs again.`,
    );
    state.done = [];
  }
  if (state.done.length > 0) log(`Continuing the deploy of ${state.account}/${state.region}: ${state.done.join(", ")} done before (--restart redoes them).`);
  state.fingerprint = fingerprint;
  save();
  const cloudflareEnv = { CLOUDFLARE_ACCOUNT_ID: account.id };

  const outputsFile = join(deps.stateDir, "outputs-core.json");
  const cdkDeploy = (stack: string, outputs?: string) => {
    const context = { ...deps.cdkContext, ...(email ? { alarmEmail: email } : {}) };
    const args = ["deploy", stack, "--exclusively", "--require-approval", "broadening", "-c", `edgetune=${JSON.stringify(context)}`];
    if (outputs) args.push("--outputs-file", outputs);
    const r = deps.run([...deps.tools.cdk, ...args]);
    if (r.status !== 0) throw new StepFailed(`cdk deploy ${stack} failed (exit ${r.status})`);
  };
  const steps: Record<Step, () => Promise<void>> = {
    core: async () => cdkDeploy(STACKS.core, outputsFile),
    worker: async () => {
      const outputs = (JSON.parse(readFileSync(outputsFile, "utf8")) as Record<string, Record<string, string>>)[STACKS.core] ?? {};
      if (!outputs.BucketName) throw new StepFailed("the core stack's outputs (BucketName) are missing: rerun with --restart");
      const { secrets, created } = await workerSecrets(deps.aws, outputs, options.rotate);
      const config = ["--config", deps.wranglerConfig];
      const put = await putSecrets((args, env) => spawnRunnerAsync([...deps.tools.wrangler, ...args], { env }), secrets, config, cloudflareEnv);
      if (put.status !== 0) throw new StepFailed(`wrangler secret bulk failed (exit ${put.status}): ${lastLine(put)}`);
      // The bucket behind the worker's R2 binding must exist before the worker that binds it is deployed.
      const r2 = wrangler(["r2", "bucket", "create", MODEL_CACHE_BUCKET], cloudflareEnv);
      if (r2.status !== 0 && !/already exists/i.test(r2.stdout + r2.stderr))
        throw new StepFailed(`wrangler r2 bucket create ${MODEL_CACHE_BUCKET} failed (exit ${r2.status}): ${lastLine(r2)}`);
      const vars = ["--var", `S3_BUCKET:${outputs.BucketName}`, "--var", `S3_REGION:${outputs.Region ?? deps.where.region}`];
      const r = deps.run([...deps.tools.wrangler, "deploy", ...config, ...vars], { env: cloudflareEnv });
      if (r.status !== 0) throw new StepFailed(`wrangler deploy failed (exit ${r.status})`);
      if (created) log(`New API key (the previous one stays valid until the next rotation):\n  ${created}`);
      log(`API keys: aws secretsmanager get-secret-value --secret-id ${outputs.ApiKeysSecretArn} --query SecretString --output text`);
      if (outputs.ConsoleKeysSecretArn)
        log(
          `Web console (the worker's URL, /), operator key: aws secretsmanager get-secret-value --secret-id ${outputs.ConsoleKeysSecretArn} --query SecretString --output text`,
        );
    },
    gpu: async () => cdkDeploy(STACKS.gpu),
  };
  // Not a failure: the default cdk.json has no CUDA base, and fine-tuning is optional (finetune runs are refused with the reason).
  const skipped = deps.config.gpuBaseImage ? [] : [{ step: "gpu" as const, reason: `no gpuBaseImage in cdk.json. ${GPU_BASE_HOWTO}` }];
  const retry = "npm run deploy";
  for (const step of STEPS) {
    if (state.done.includes(step)) continue;
    const skip = skipped.find((s) => s.step === step);
    if (skip) {
      log(`── ${step} ── skipped: ${skip.reason}`);
      continue;
    }
    log(`── ${step} ──`);
    try {
      await steps[step]();
    } catch (e) {
      const message = userMessage(e);
      state.failed = { step, message, at: new Date().toISOString() };
      save();
      const standing =
        state.done.length > 0
          ? `Deployed and working: ${state.done.join(", ")}${state.done.includes("core") ? " (head training)" : ""}.`
          : "Nothing was deployed.";
      log(`deploy: the ${step} step failed: ${message}\n${standing}\nFix it, then run  ${retry}  — it continues at the ${step} step.`);
      return { completed: [...state.done], failed: { step, message, retry } };
    }
    state.done.push(step);
    state.failed = undefined;
    save();
  }
  const completed = [...state.done];
  state.done = [];
  save();
  log(`Deployed: ${completed.join(", ")}.`);
  return skipped.length > 0 ? { completed, skipped } : { completed };
}

const GPU_BASE_HOWTO =
  'Fine-tuning needs the GPU image\'s CUDA base pinned by digest (context.edgetune.gpuBaseImage); mirror it into your ECR and set it as infra/README.md "The GPU image\'s base" shows (docker pull nvidia/cuda:11.2.2-cudnn8-runtime-ubuntu20.04, then docker inspect --format "{{index .RepoDigests 0}}"), then npm run deploy. Head-only training works without it.';

/** What a deploy deploys, as one hash: steps done under another fingerprint are not this deploy's. */
export function deployFingerprint(inputs: {
  code: string | undefined;
  context: Record<string, unknown>;
  email: string | undefined;
  cloudflareAccountId: string;
  rotate: boolean;
}): string {
  // Unknown code never matches an earlier deploy: nothing is skipped on a guess.
  const code = inputs.code ?? randomUUID();
  return createHash("sha256")
    .update(JSON.stringify({ ...inputs, code }))
    .digest("hex");
}

async function askEmail(deps: DeployDeps): Promise<string | undefined> {
  if (!deps.ask) return undefined;
  const answer = (await deps.ask("E-mail address for failure alerts (empty for none): ")).trim();
  return answer === "" ? undefined : answer;
}

const lastLine = (r: { stdout: string; stderr: string }) =>
  `${r.stderr}\n${r.stdout}`
    .trim()
    .split("\n")
    .filter((l) => l.trim())
    .at(-1) ?? "";
