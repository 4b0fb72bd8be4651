import { createServer, type Server } from "node:http";
import { createRequire } from "node:module";
import type { AddressInfo } from "node:net";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import { readMetadata, readPointer } from "../../../../shared/artifacts.ts";
import { uploadSample } from "../../../../test/support/datasets.ts";
import { memoryLogger } from "../log.ts";
import { train } from "../train.ts";
import { initBackend } from "./backend.ts";
import { AUTO_BASE, BEST_BUNDLED_BASE, PREFERRED_DOWNLOADED_BASE, resolveBase } from "./bases.ts";

/**
 * The `auto` default, offline: a local HTTP server stands in for Teachable Machine's bucket
 * (EDGETUNE_BASE_MIRROR), serving a real Keras MobileNetV2 LayersModel — the one inside the nsfwjs npm
 * package, same topology and layer names as the ImageNet one, its own weights — as model.json and a
 * weights file, the way Teachable Machine publishes its bases.
 */
const PATH = "/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.00_224_no_top/";
let server: Server;
let requests: string[] = [];
let up = true;
let mirror = "";

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
    requests.push(req.url ?? "");
    if (!up) {
      res.writeHead(503).end();
      return;
    }
    if (req.url === `${PATH}model.json`) res.writeHead(200, { "content-type": "application/json" }).end(modelJson);
    else if (req.url === `${PATH}group1-shard1of1.bin`) res.writeHead(200, { "content-type": "application/octet-stream" }).end(weights);
    else res.writeHead(404).end();
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  mirror = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  process.env.EDGETUNE_BASE_MIRROR = mirror;
});
afterAll(async () => {
  delete process.env.EDGETUNE_BASE_MIRROR;
  await new Promise((r) => server?.close(r));
});

let s3: LocalS3;
afterEach(async () => {
  await s3?.stop();
  requests = [];
  up = true;
});

describe("the auto base", () => {
  it("downloads the ImageNet MobileNetV2 once into the bucket and uses it; then reads it from the bucket", async () => {
    s3 = await startLocalS3();
    const first = await resolveBase(s3.store, AUTO_BASE);
    expect(first.base).toMatchObject({ id: PREFERRED_DOWNLOADED_BASE, featureLayer: "out_relu", normalization: "minus1-1" });
    expect(first.choice?.reason).toBe("mobilenet-v2-100 (ImageNet MobileNetV2) was downloaded once into the bucket");
    expect(requests).toEqual([`${PATH}model.json`, `${PATH}group1-shard1of1.bin`]);
    const again = await resolveBase(s3.store, AUTO_BASE);
    expect(again.base.sha256).toBe(first.base.sha256);
    expect(again.choice?.reason).toBe("mobilenet-v2-100 (ImageNet MobileNetV2) is in the bucket");
    expect(requests.length).toBe(2);
  });

  it("falls back to the best bundled base when the download fails, says why, and does not try again for a day", async () => {
    s3 = await startLocalS3();
    up = false;
    const r = await resolveBase(s3.store, AUTO_BASE);
    expect(r.base.id).toBe(BEST_BUNDLED_BASE);
    expect(r.choice?.reason).toMatch(/^mobilenet-v2-100 could not be downloaded \(.*503.*\); using the best bundled base, darknet-tiny$/);
    const tried = requests.length;
    expect(tried).toBeGreaterThan(0);
    up = true;
    const later = await resolveBase(s3.store, AUTO_BASE);
    expect(later.base.id).toBe(BEST_BUNDLED_BASE);
    expect(later.choice?.reason).toContain("tried again a day later");
    expect(requests.length).toBe(tried);
  });

  it("names the base it resolved to in the version id: auto that falls back is the same version as the bundled base by name", async () => {
    s3 = await startLocalS3();
    up = false;
    await uploadSample(s3.store, "emoji", { perLabel: 8, size: 96 });
    const options = { dataset: "emoji", imageSize: 96, views: 1, head: { epochs: 3 }, promote: "always" } as const;
    const auto = await train(s3.store, { ...options, base: "auto" }, memoryLogger());
    const named = await train(s3.store, { ...options, base: BEST_BUNDLED_BASE }, memoryLogger());
    expect(named.version).toBe(auto.version);
    expect(named.status).toBe("exists");
  });

  it("records the choice and its reason in the version's metadata and report", async () => {
    s3 = await startLocalS3();
    await uploadSample(s3.store, "emoji", { perLabel: 8, size: 96 });
    const r = await train(s3.store, { dataset: "emoji", base: "auto", imageSize: 96, views: 1, head: { epochs: 5 }, promote: "always" }, memoryLogger());
    const meta = await readMetadata(s3.store, "emoji", (await readPointer(s3.store, "emoji"))?.version as string);
    expect(meta.base).toMatchObject({ id: PREFERRED_DOWNLOADED_BASE, choice: { requested: "auto", reason: expect.stringContaining("downloaded once") } });
    const report = JSON.parse(new TextDecoder().decode((await s3.store.get(`models/emoji/${r.version}/report.json`)) as Uint8Array));
    expect(report.base.choice.requested).toBe("auto");
    expect(new TextDecoder().decode((await s3.store.get(`models/emoji/${r.version}/report.html`)) as Uint8Array)).toContain("auto: mobilenet-v2-100");
  });
});
