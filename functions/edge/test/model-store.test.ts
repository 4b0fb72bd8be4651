import { execFile } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPromotedModel, readSharedBase } from "#shared/artifacts.ts";
import { SPLIT_FILES, servedFiles } from "#shared/contracts/artifact.ts";
import { type EdgeWorker, startEdgeWorker } from "../../../infra/local/edge-worker.ts";
import { type LocalS3, startLocalS3 } from "../../../infra/local/s3-server.ts";
import type { SampleImage } from "../../../jobs/train/src/dataset/sample.ts";
import { memoryLogger } from "../../../jobs/train/src/log.ts";
import { train } from "../../../jobs/train/src/train.ts";
import { uploadSample } from "../../../test/support/datasets.ts";
import { postClassify } from "../../../test/support/edge.ts";
import { type FaultProxy, startFaultProxy } from "../../../test/support/fault-proxy.ts";

/**
 * Where the worker's model bytes come from, in real workerd (`wrangler dev`, the production
 * wrangler.jsonc with its R2 binding, wrangler's local R2) against the local S3 server behind a proxy
 * that can take the bucket's model files away or refuse the worker's credentials.
 */
type Req = { method: string; path: string };
let s3: LocalS3;
let proxy: FaultProxy;
let images: SampleImage[];
let sampleImage: SampleImage;
let version: string;
/** The files the worker reads through the cache besides metadata.json: the head's, and the shared base's with its base.json. */
let cachedFiles: { path: string; sha256: string }[];
let modelFilesDown = false;
let refusal: ((r: Req) => string | undefined) | undefined;
const isVersionFile = (r: Req) => /\/models\/emoji\/v[0-9a-f]{12}\//.test(r.path);

beforeAll(async () => {
  s3 = await startLocalS3({ bucket: "model-store" });
  images = await uploadSample(s3.store, "emoji", { perLabel: 8, size: 96 });
  sampleImage = images[0] as SampleImage;
  const r = await train(s3.store, { dataset: "emoji", imageSize: 96, views: 1, head: { epochs: 5 }, promote: "always" }, memoryLogger());
  version = r.version;
  const { metadata } = await readPromotedModel(s3.store, "emoji");
  const split = metadata.split as NonNullable<typeof metadata.split>;
  const shared = await readSharedBase(s3.store, metadata.base.sha256, metadata.input.size, split.baseManifestSha256);
  cachedFiles = [
    ...servedFiles(metadata).files, // the head, its shard and the labels' directions
    ...shared.manifest.files,
    { path: SPLIT_FILES.baseManifest, sha256: split.baseManifestSha256 },
  ];
  proxy = await startFaultProxy(s3.endpoint, {
    every: Number.MAX_SAFE_INTEGER,
    down: (r) => modelFilesDown && isVersionFile(r),
    refuse: (r) => refusal?.(r),
  });
}, 300_000);
afterAll(async () => {
  await proxy?.stop();
  await s3?.stop();
});

const start = (persistTo?: string) => startEdgeWorker({ s3Endpoint: proxy.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 1, persistTo });
type Health = {
  status: string;
  models: { name: string; version: string | null; problem: string | null; code: string | null }[];
  modelCache: { kind: string; found: number; stored: number } | null;
};
const health = async (edge: EdgeWorker) =>
  (await (await fetch(`${edge.url}/healthz`, { headers: { authorization: `Bearer ${edge.apiKey}` } })).json()) as Health;

async function eventually<T>(what: () => Promise<T>, ok: (v: T) => boolean, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await what();
    if (ok(v) || Date.now() > deadline) return v;
    await new Promise((r) => setTimeout(r, 250));
  }
}

describe("the model store at the edge (R2, read-through)", () => {
  it("loads a version from S3 once; a restarted worker reads it from R2 with S3's model files gone; a tampered R2 object is refused and fetched again", async () => {
    const state = await mkdtemp(join(tmpdir(), "edgetune-r2-"));
    const files = cachedFiles.length + 1; // and metadata.json
    try {
      // 1. First load: from S3, verified, then put into R2 (in the background, after the answer).
      let edge = await start(state);
      try {
        const res = await postClassify(edge, "emoji", sampleImage);
        expect(res.status).toBe(200);
        expect(((await res.json()) as { version: string }).version).toBe(version);
        const h = await eventually(
          () => health(edge),
          (x) => x.modelCache?.stored === files,
        );
        expect(h.modelCache).toEqual({ kind: "r2", found: 0, stored: files });
      } finally {
        await edge.stop();
      }

      // 2. A new worker (new isolates) while S3 resets every request for the version's files: R2 serves them.
      modelFilesDown = true;
      const seen = proxy.requests.length;
      edge = await start(state);
      try {
        expect((await postClassify(edge, "emoji", sampleImage)).status).toBe(200);
        expect((await health(edge)).modelCache).toEqual({ kind: "r2", found: files, stored: 0 });
        // Only the pointer came from S3.
        expect(proxy.requests.slice(seen).filter(isVersionFile)).toEqual([]);
        expect(proxy.requests.slice(seen).some((r) => r.path.endsWith("/models/emoji/current.json"))).toBe(true);
      } finally {
        await edge.stop();
      }

      // 3. Someone overwrites the weights in R2. With S3's files still down the version is refused, not served…
      const shard = cachedFiles.find((f) => f.path === SPLIT_FILES.headWeights) as { sha256: string };
      const tampered = join(state, "tampered.bin");
      await writeFile(tampered, new Uint8Array(4096).fill(7));
      await promisify(execFile)(
        process.execPath,
        [
          join("node_modules", "wrangler", "bin", "wrangler.js"),
          "r2",
          "object",
          "put",
          `edgetune-model-cache/sha256/${shard.sha256}`,
          "--file",
          tampered,
          "--local",
          "--persist-to",
          state,
          "--config",
          "functions/edge/wrangler.jsonc",
        ],
        { env: { ...process.env, CLOUDFLARE_CF_FETCH_ENABLED: "false", WRANGLER_SEND_METRICS: "false", CI: "true" } },
      );
      edge = await start(state);
      try {
        const refused = await postClassify(edge, "emoji", sampleImage);
        expect(refused.status).toBe(503);
        expect(((await refused.json()) as { error: { code: string } }).error.code).toBe("model_unavailable");
        // … and once S3 answers again, the shard is fetched from S3, verified, and put back into R2.
        modelFilesDown = false;
        const served = await eventually(
          () => postClassify(edge, "emoji", sampleImage),
          (r) => r.status === 200,
        );
        expect(served.status).toBe(200);
        const shardGets = proxy.requests.filter((r) => r.method === "GET" && r.path.endsWith(`/${version}/${SPLIT_FILES.headWeights}`));
        expect(shardGets.length).toBeGreaterThanOrEqual(1);
        expect(
          (
            await eventually(
              () => health(edge),
              (x) => x.modelCache?.stored === 1,
            )
          ).modelCache,
        ).toMatchObject({ kind: "r2", stored: 1 });
      } finally {
        await edge.stop();
      }

      // 4. R2 holds the good bytes again: another worker loads with S3's files down.
      modelFilesDown = true;
      edge = await start(state);
      try {
        expect((await postClassify(edge, "emoji", sampleImage)).status).toBe(200);
        expect((await health(edge)).modelCache).toEqual({ kind: "r2", found: files, stored: 0 });
      } finally {
        await edge.stop();
        modelFilesDown = false;
      }
    } finally {
      await rm(state, { recursive: true, force: true });
    }
  }, 300_000);
});

describe("a refused store credential", () => {
  let edge: EdgeWorker;
  beforeAll(async () => {
    edge = await start();
  }, 120_000);
  afterAll(async () => {
    refusal = undefined;
    await edge?.stop();
  });

  it("is a 503 store_access_denied with a line in /healthz, never a 404", async () => {
    // A key that S3 does not know (rotated or deleted): every request refused.
    refusal = () => "InvalidAccessKeyId";
    const res = await postClassify(edge, "emoji", sampleImage);
    expect(res.status).toBe(503);
    expect(res.headers.get("retry-after")).toMatch(/^\d+$/);
    const body = (await res.json()) as { error: { code: string; message: string } };
    expect(body.error.code).toBe("store_access_denied");
    expect(body.error.message).toMatch(/refused this worker's credentials/);
    expect(body.error.message).not.toMatch(/local-secret|\n\s+at /); // no secret, no stack trace
    // Nor internals, to a client key: S3's error code, a key path, the secrets' names (they are in /healthz for operators).
    expect(body.error.message).not.toMatch(/InvalidAccessKeyId|AccessDenied|models\/|AWS_|SECRET|HTTP 40/);
    const h = await health(edge);
    expect(h.status).toBe("degraded");
    expect(h.models).toContainEqual(
      expect.objectContaining({ name: "emoji", code: "store_access_denied", problem: expect.stringMatching(/InvalidAccessKeyId/) }),
    );
  });

  it("tells a missing model from a refused key when S3 answers AccessDenied for both", async () => {
    // Reads refused, listings allowed: the listing shows the pointer does not exist.
    refusal = (r) => (r.path.includes("list-type=2") ? undefined : "AccessDenied");
    const missing = await postClassify(edge, "nosuch", sampleImage);
    expect(missing.status).toBe(404);
    expect(((await missing.json()) as { error: { code: string } }).error.code).toBe("model_not_found");
    // Reads and listings refused: nothing proves the model missing, the key is what fails.
    refusal = () => "AccessDenied";
    const refused = await postClassify(edge, "other", sampleImage);
    expect(refused.status).toBe(503);
    const refusedBody = (await refused.json()) as { error: { code: string; message: string } };
    expect(refusedBody.error.code).toBe("store_access_denied");
    expect(refusedBody.error.message).not.toMatch(/AccessDenied|models\/|AWS_|HTTP 40/);
  });
});
