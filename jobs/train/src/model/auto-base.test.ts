import { existsSync, readFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { createRequire } from "node:module";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { readMetadata, readPointer } from "#shared/artifacts.ts";
import { EdgetuneError } from "#shared/errors.ts";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import { uploadSample } from "../../../../test/support/datasets.ts";
import { SHARED_MODELS } from "../../../../test/support/shared.ts";
import { memoryLogger } from "../log.ts";
import { train } from "../train.ts";
import { initBackend } from "./backend.ts";
import { AUTO_BASE, NSFWJS_BASE, obtainBase, resolveBase } from "./bases.ts";

/**
 * The `auto` default and where bases come from, offline: a local HTTP server stands in for the publishers
 * (EDGETUNE_BASE_MIRROR). For Teachable Machine it serves a real Keras MobileNetV2 LayersModel — the one
 * inside the nsfwjs npm package, same topology and layer names as the ImageNet one, its own weights — as
 * model.json and a weights file, the way Teachable Machine publishes its bases; for ml5 it serves
 * ../shared/models/darknet_tiny (the files ml5 serves), where that exists.
 */
const TM_PATH = "/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.00_224_no_top/";
const ML5_PATH = "/models/darknetclassifier/darknettiny/";
const DARKNET = join(SHARED_MODELS, "darknet_tiny");
let server: Server;
let requests: string[] = [];
let up = true;
let tamper = false;
const saved = { ...process.env };

beforeAll(async () => {
  await initBackend();
  const require = createRequire(import.meta.url);
  const entry = require.resolve("nsfwjs");
  const dir = `${entry.slice(0, entry.lastIndexOf("/dist/"))}/dist/models/mobilenet_v2/`;
  const model = require(`${dir}model.min.js`) as { modelTopology: object; weightsManifest: { weights: object[] }[] };
  const weights = Buffer.from(require(`${dir}group1-shard1of1.min.js`) as string, "base64");
  const modelJson = JSON.stringify({
    format: "layers-model",
    modelTopology: model.modelTopology,
    weightsManifest: [{ paths: ["group1-shard1of1.bin"], weights: model.weightsManifest.flatMap((g) => g.weights) }],
  });
  server = createServer((req, res) => {
    const url = req.url ?? "";
    requests.push(url);
    if (!up) {
      res.writeHead(503).end();
      return;
    }
    if (url === `${TM_PATH}model.json`) res.writeHead(200, { "content-type": "application/json" }).end(modelJson);
    else if (url === `${TM_PATH}group1-shard1of1.bin`) res.writeHead(200, { "content-type": "application/octet-stream" }).end(weights);
    else if (url.startsWith(ML5_PATH) && existsSync(join(DARKNET, url.slice(ML5_PATH.length)))) {
      const bytes = readFileSync(join(DARKNET, url.slice(ML5_PATH.length)));
      if (tamper && url.endsWith("group19-shard1of1")) bytes[10] = (bytes[10] as number) ^ 0xff;
      res.writeHead(200).end(bytes);
    } else res.writeHead(404).end();
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  // This file is about sources: no bases directory and downloads allowed unless a test says otherwise.
  process.env.EDGETUNE_BASE_MIRROR = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  delete process.env.EDGETUNE_BASES_DIR;
  process.env.EDGETUNE_OFFLINE = "0";
});
afterAll(async () => {
  process.env = saved;
  await new Promise((r) => server?.close(r));
});

let s3: LocalS3;
afterEach(async () => {
  await s3?.stop();
  requests = [];
  up = true;
  tamper = false;
  delete process.env.EDGETUNE_BASES_DIR;
  process.env.EDGETUNE_OFFLINE = "0";
});

describe("the auto base", () => {
  it("downloads the Keras ImageNet MobileNetV2 once into the bucket when no bases directory has the slim one; then reads it from the bucket", async () => {
    s3 = await startLocalS3();
    const first = await resolveBase(s3.store, AUTO_BASE);
    expect(first.base).toMatchObject({ id: "mobilenet-v2-100", featureLayer: "out_relu", normalization: "minus1-1" });
    expect(first.choice?.reason).toMatch(/^mobilenet-v2-100 from http:\/\/127\.0\.0\.1:\d+\/mobilenet_v2_.*EDGETUNE_BASE_MIRROR.*no pinned sha256/);
    expect(first.choice?.reason).toContain("passed over: mobilenet-v2-slim-100: no bases directory (EDGETUNE_BASES_DIR is not set)");
    expect(requests).toEqual([`${TM_PATH}model.json`, `${TM_PATH}group1-shard1of1.bin`]);
    const again = await resolveBase(s3.store, AUTO_BASE);
    expect(again.base.sha256).toBe(first.base.sha256);
    expect(again.from).toBe("the bucket");
    expect(requests.length).toBe(2);
  });

  it("ends at the nsfwjs base, named as the last resort, when nothing else is there; a failed download is not tried again for a day", async () => {
    s3 = await startLocalS3();
    up = false;
    const r = await resolveBase(s3.store, AUTO_BASE);
    expect(r.base.id).toBe(NSFWJS_BASE);
    expect(r.choice?.reason).toMatch(/^nsfwjs-mobilenet-v2 from npm nsfwjs .*\(the last resort, not a clean ImageNet base\); passed over: /);
    expect(r.choice?.reason).toMatch(/mobilenet-v2-100: .*answered HTTP 503/);
    const tried = requests.length;
    expect(tried).toBe(1); // one failed download, then no other publisher is asked in this run
    up = true;
    await s3.store.delete([`bases/${NSFWJS_BASE}/base.json`]);
    const later = await resolveBase(s3.store, AUTO_BASE);
    expect(later.base.id).toBe(NSFWJS_BASE);
    expect(later.choice?.reason).toContain("download skipped (a recent download failed)");
    expect(requests.length).toBe(tried);
  });

  it("offline by design: no download is tried, and the run logs one line saying which base and why — no network error", async () => {
    s3 = await startLocalS3();
    process.env.EDGETUNE_OFFLINE = "1";
    await uploadSample(s3.store, "emoji", { perLabel: 8, size: 96 });
    const log = memoryLogger();
    await train(s3.store, { dataset: "emoji", base: "auto", imageSize: 96, views: 1, head: { epochs: 3 }, promote: "always" }, log);
    expect(requests).toEqual([]);
    // Lines about the base, less publishing the shared base for the edge (one base, many models): that is
    // not about which base was chosen.
    const about = log.lines.filter(
      (l) => JSON.stringify(l).match(/base|nsfwjs|download/i) && !l.message.startsWith("score") && !l.message.startsWith("write shared base"),
    );
    expect(about.map((l) => l.message)).toEqual(["base done"]);
    expect(about[0]?.fields?.chosen).toMatch(/^nsfwjs-mobilenet-v2 from npm nsfwjs.*last resort.*downloads are off \(EDGETUNE_OFFLINE\)/);
    expect(JSON.stringify(log.lines)).not.toMatch(/ENOTFOUND|EAI_AGAIN|fetch failed/);
  });

  it("names the base it resolved to in the version id: auto that falls back is the same version as that base by name", async () => {
    s3 = await startLocalS3();
    process.env.EDGETUNE_OFFLINE = "1";
    await uploadSample(s3.store, "emoji", { perLabel: 8, size: 96 });
    const options = { dataset: "emoji", imageSize: 96, views: 1, head: { epochs: 3 }, promote: "always" } as const;
    const auto = await train(s3.store, { ...options, base: "auto" }, memoryLogger());
    const named = await train(s3.store, { ...options, base: NSFWJS_BASE }, memoryLogger());
    expect(named.version).toBe(auto.version);
    expect(named.status).toBe("exists");
  });

  it("records the choice and its reason in the version's metadata and report", async () => {
    s3 = await startLocalS3();
    await uploadSample(s3.store, "emoji", { perLabel: 8, size: 96 });
    const r = await train(s3.store, { dataset: "emoji", base: "auto", imageSize: 96, views: 1, head: { epochs: 5 }, promote: "always" }, memoryLogger());
    const meta = await readMetadata(s3.store, "emoji", (await readPointer(s3.store, "emoji"))?.version as string);
    expect(meta.base).toMatchObject({ id: "mobilenet-v2-100", choice: { requested: "auto", reason: expect.stringContaining("EDGETUNE_BASE_MIRROR") } });
    const report = JSON.parse(new TextDecoder().decode((await s3.store.get(`models/emoji/${r.version}/report.json`)) as Uint8Array));
    expect(report.base.choice.requested).toBe("auto");
    expect(new TextDecoder().decode((await s3.store.get(`models/emoji/${r.version}/report.html`)) as Uint8Array)).toContain("auto: mobilenet-v2-100 from");
  });
});

describe.skipIf(!existsSync(SHARED_MODELS))("bases from a bases directory and their publishers' pins (needs ../shared/models)", () => {
  it("auto takes the slim ImageNet MobileNetV2 from the bases directory, without any download", async () => {
    s3 = await startLocalS3();
    process.env.EDGETUNE_BASES_DIR = SHARED_MODELS;
    const r = await resolveBase(s3.store, AUTO_BASE);
    expect(r.base).toMatchObject({ id: "mobilenet-v2-slim-100", featureLayer: "out_relu", normalization: "minus1-1", fineTuneFrom: "block_12_add" });
    expect(r.choice?.reason).toBe(
      `mobilenet-v2-slim-100 from bases directory ${join(SHARED_MODELS, "mobilenet_v2_1.0_224_slim")} (EDGETUNE_BASES_DIR) (the first of auto's order available)`,
    );
    expect(requests).toEqual([]);
  });

  it("downloads darknet-tiny from ml5's origin pinned by sha256, and refuses a copy that differs by one byte", async () => {
    s3 = await startLocalS3();
    const got = await obtainBase(s3.store, "darknet-tiny");
    expect(got.from).toMatch(
      /\/models\/darknetclassifier\/darknettiny\/model\.json \(EDGETUNE_BASE_MIRROR, standing in for https:\/\/cdn\.jsdelivr\.net\/gh\/ml5js\/.*\), sha256-pinned$/,
    );
    expect(requests.length).toBe(32);
    const s3b = await startLocalS3({ bucket: "tampered" });
    try {
      tamper = true;
      const err = await obtainBase(s3b.store, "darknet-tiny").catch((e: unknown) => e);
      expect(err).toBeInstanceOf(EdgetuneError);
      expect((err as EdgetuneError).code).toBe("integrity_mismatch");
      expect((err as Error).message).toMatch(/not the ones edgetune pins/);
      expect(await s3b.store.head("bases/darknet-tiny/base.json")).toBeNull();
    } finally {
      await s3b.stop();
    }
  });
});
