import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { cp, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPointer } from "#shared/artifacts.ts";
import { jobEnvironment } from "../infra/local/job-env.ts";
import { type LocalS3, startLocalS3 } from "../infra/local/s3-server.ts";
import { uploadSample } from "./support/datasets.ts";

const run = promisify(execFile);
/** A machine with no bases directory, on the default base (the suite's own settings point at ../shared/models). */
const withoutBases = ({ EDGETUNE_BASES_DIR: _, EDGETUNE_DEFAULT_BASE: __, ...env }: NodeJS.ProcessEnv) => env;

/**
 * The training images' install (jobs/train/Dockerfile.cpu is exactly this; jobs/train/Dockerfile adds
 * tfjs-node-gpu on top), made the way the Dockerfiles make it — its build context (what
 * .dockerignore lets through) and `npm ci --omit=dev` in a folder of its own — then `edgetune train`
 * from that folder, on the Node major the image uses, against a real S3 API server. What stays
 * unverified here is the GPU itself (tfjs-node-gpu's kernels on CUDA): see infra/README.md.
 */
const root = join(import.meta.dirname, "..");
let staging: string;
let s3: LocalS3;

beforeAll(async () => {
  staging = await mkdtemp(join(tmpdir(), "edgetune-image-"));
  for (const path of ["package.json", "package-lock.json", "shared", "jobs/train"])
    await cp(join(root, path), join(staging, path), { recursive: true, filter: (src) => !src.endsWith(".test.ts") });
  await run("npm", ["ci", "--omit=dev", "--no-audit", "--no-fund"], { cwd: staging, timeout: 600_000 });
  // The images then drop onnxruntime-node's binaries for other platforms: the same command, taken from the Dockerfile.
  const prune = /rm -rf (node_modules\/onnxruntime-node\/[^\n\\]*)/.exec(await readFile(join(root, "jobs/train/Dockerfile.cpu"), "utf8"))?.[1];
  if (!prune) throw new Error("jobs/train/Dockerfile.cpu no longer prunes onnxruntime-node: update this test");
  await run("sh", ["-c", `rm -rf ${prune}`], { cwd: staging });
  s3 = await startLocalS3({ bucket: "image" });
}, 900_000);
afterAll(async () => {
  await s3?.stop();
  if (staging) await rm(staging, { recursive: true, force: true });
});

describe("the training image's production install", () => {
  it("holds production dependencies only, and runs on the Node major the image is built from", async () => {
    for (const dev of ["wrangler", "aws-cdk-lib", "vitest", "node", "@biomejs/biome", "@twemoji/svg"])
      expect([dev, existsSync(join(staging, "node_modules", dev))]).toEqual([dev, false]);
    for (const prod of ["@tensorflow/tfjs", "@tensorflow/tfjs-backend-wasm", "sharp", "nsfwjs", "@aws-sdk/client-s3"])
      expect([prod, existsSync(join(staging, "node_modules", prod))]).toEqual([prod, true]);
    // linux/amd64 only: the other platforms' ONNX Runtime binaries (≈ 255 MB) are gone, this one stays.
    const ort = join(staging, "node_modules/onnxruntime-node/bin/napi-v6");
    expect(["darwin", "win32", "linux/arm64", "linux/x64"].map((p) => existsSync(join(ort, p)))).toEqual([false, false, false, true]);
    const dockerfile = await readFile(join(root, "jobs/train/Dockerfile"), "utf8");
    const imageMajor = /FROM [^\n]*node:(\d+)-/.exec(dockerfile)?.[1];
    expect(process.versions.node.split(".")[0]).toBe(imageMajor);
  });

  it("trains a real dataset from that folder, as the Batch container runs it, on the default base with no bases directory and no network", async () => {
    await uploadSample(s3.store, "image-check", { perLabel: 8 });
    const { stdout, stderr } = await run(
      process.execPath,
      [
        join(staging, "jobs/train/cli.ts"),
        "train",
        "--dataset",
        "image-check",
        "--image-size",
        "96",
        "--views",
        "1",
        "--epochs",
        "3",
        "--promote",
        "always",
        "--json",
      ],
      { cwd: staging, env: withoutBases(jobEnvironment(s3.config, { NODE_ENV: "production", EDGETUNE_OFFLINE: "1" })), timeout: 300_000 },
    );
    expect(`${stdout}${stderr}`).toMatch(/"message":"backend wasm"/); // no GPU here: the same code on wasm
    expect(`${stdout}${stderr}`).toMatch(/"engine":"onnxruntime"/); // the pruned install's ONNX Runtime loads
    // No weights ship with the project: offline and without ../shared, `auto` ends at the nsfwjs base, and says so once.
    expect(`${stdout}${stderr}`).toMatch(/"chosen":"nsfwjs-mobilenet-v2 from npm nsfwjs[^"]*the last resort/);
    expect(`${stdout}${stderr}`).not.toMatch(/ENOTFOUND|EAI_AGAIN|fetch failed/);
    expect((await readPointer(s3.store, "image-check"))?.version).toMatch(/^v[0-9a-f]{12}$/);
  }, 300_000);
});
