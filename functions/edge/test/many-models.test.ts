import * as tf from "@tensorflow/tfjs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPointer, readPromotedModel, writeArtifact, writePointer } from "#shared/artifacts.ts";
import { type Served, servedFiles } from "#shared/contracts/artifact.ts";
import { keys } from "#shared/keys.ts";
import { preprocess } from "#shared/preprocess.ts";
import { type EdgeWorker, startEdgeWorker } from "../../../infra/local/edge-worker.ts";
import { type LocalS3, startLocalS3 } from "../../../infra/local/s3-server.ts";
import { decodeImage } from "../../../jobs/train/src/dataset/decode.ts";
import { memoryLogger } from "../../../jobs/train/src/log.ts";
import { loadModel } from "../../../jobs/train/src/model/io.ts";
import { train } from "../../../jobs/train/src/train.ts";
import { uploadSample } from "../../../test/support/datasets.ts";
import { postClassify } from "../../../test/support/edge.ts";
import { publishCopy } from "../../../test/support/versions.ts";

/**
 * One base, many models, in real workerd (`wrangler dev`, production config and bundle) against a real
 * S3 API server: heads of one base share one copy of it, switching between them reloads nothing, a
 * whole-model version (as published before split versions existed) still serves, and the memory
 * budget evicts the least recently used head, not the base its neighbours hold.
 */
let s3: LocalS3;
let edge: EdgeWorker;
let images: Awaited<ReturnType<typeof uploadSample>>;

const WHOLE_VERSION = "v000000000001";

beforeAll(async () => {
  s3 = await startLocalS3();
  images = await uploadSample(s3.store, "emoji", { perLabel: 8 });
  const quick = { dataset: "emoji", imageSize: 96, views: 1, head: { epochs: 5 }, promote: "always" } as const;
  await train(s3.store, { ...quick, model: "head-a" }, memoryLogger());
  await train(s3.store, { ...quick, model: "head-b", seed: 7 }, memoryLogger());
  // A version as published before the split form (and the novelty rule): the same whole model, no head, no `split`.
  const a = await readPromotedModel(s3.store, "head-a");
  const { split: _split, files: _files, novelty: _novelty, ...metadata } = a.metadata;
  const whole = await writeArtifact(s3.store, { ...metadata, name: "whole", version: WHOLE_VERSION }, [
    { path: "model.json", bytes: a.files.get("model.json") as Uint8Array },
    { path: "group1-shard1of1.bin", bytes: a.files.get("group1-shard1of1.bin") as Uint8Array },
  ]);
  await writePointer(s3.store, "whole", {
    version: WHOLE_VERSION,
    metadataSha256: whole.metadataSha256,
    promotedAt: new Date().toISOString(),
    previous: null,
    reason: "test",
  });
  edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 60 });
});
afterAll(async () => {
  await edge?.stop();
  await s3?.stop();
});

type Health = {
  models: { name: string; version: string | null; base: string | null; bytes: number | null }[];
  bases: { sha256: string; size: number; heads: number; loadedAt?: string; problem?: string; failures?: number; retryAt?: string }[];
};
const health = async (worker: EdgeWorker) =>
  (await (await fetch(`${worker.url}/healthz`, { headers: { authorization: `Bearer ${worker.apiKey}` } })).json()) as Health;
const loadedAt = async (worker: EdgeWorker, name: string) =>
  ((await (await fetch(`${worker.url}/v1/models/${name}`, { headers: { authorization: `Bearer ${worker.apiKey}` } })).json()) as { load: { loadedAt: string } })
    .load.loadedAt;
type Scores = { model: string; version: string; predictions: { label: string; score: number }[] };

describe("one base, many models", () => {
  it("answers each head as its whole model does in Node, and still serves a whole-model version", async () => {
    const img = images[0] as (typeof images)[number];
    for (const name of ["head-a", "head-b", "whole"]) {
      const res = await postClassify(edge, name, img);
      expect(res.status).toBe(200);
      const body = (await res.json()) as Scores;
      const { metadata, files } = await readPromotedModel(s3.store, name);
      const model = await loadModel(files.get("model.json") as Uint8Array, files);
      const input = preprocess(await decodeImage(img.bytes), metadata.input.size, metadata.preprocessing);
      const node = tf.tidy(() => (model.predict(tf.tensor4d(input, [1, 96, 96, 3])) as tf.Tensor).dataSync());
      model.dispose();
      for (const p of body.predictions) expect(Math.abs(p.score - (node[metadata.labels.indexOf(p.label)] as number))).toBeLessThan(1e-3);
    }
  });

  it("keeps one copy of the base for both heads (/healthz), and the whole model apart", async () => {
    const h = await health(edge);
    const byName = new Map(h.models.map((m) => [m.name, m]));
    const a = byName.get("head-a");
    expect(a?.base).toBeTruthy();
    expect(byName.get("head-b")?.base).toBe(a?.base);
    expect(byName.get("whole")?.base).toBeNull();
    expect(h.bases).toHaveLength(1);
    expect(h.bases[0]?.heads).toBe(2);
    expect(`${h.bases[0]?.sha256}-${h.bases[0]?.size}`).toBe(a?.base);
    // A head is KB; the whole model carries its own copy of the base.
    expect(a?.bytes).toBeLessThan((byName.get("whole")?.bytes ?? 0) / 10);
  });

  it("switches between heads without reloading either, or the base", async () => {
    const before = await Promise.all(["head-a", "head-b"].map((n) => loadedAt(edge, n)));
    const baseBefore = (await health(edge)).bases[0]?.loadedAt;
    for (let i = 0; i < 6; i++) {
      const name = i % 2 ? "head-b" : "head-a";
      expect((await postClassify(edge, name, images[i] as (typeof images)[number])).status).toBe(200);
    }
    expect(await Promise.all(["head-a", "head-b"].map((n) => loadedAt(edge, n)))).toEqual(before);
    expect((await health(edge)).bases[0]?.loadedAt).toBe(baseBefore);
  });

  it("classifies one image with several models in one request, each as its single classify answers", async () => {
    const img = images[2] as (typeof images)[number];
    const single = new Map<string, Scores>();
    for (const name of ["head-a", "head-b", "whole"]) single.set(name, (await (await postClassify(edge, name, img, {})).json()) as Scores);
    const res = await fetch(`${edge.url}/v1/classify?models=head-a,head-b,nosuch,whole&top_k=3`, {
      method: "POST",
      headers: { authorization: `Bearer ${edge.apiKey}`, "content-type": img.file.endsWith(".jpg") ? "image/jpeg" : "image/png" },
      body: img.bytes as BodyInit,
    });
    expect(res.status).toBe(200);
    expect(res.headers.get("server-timing")).toMatch(/inference;dur=[\d.]+/);
    const body = (await res.json()) as { results: (Scores | { model: string; error: { code: string } })[] };
    expect(body.results.map((r) => r.model)).toEqual(["head-a", "head-b", "nosuch", "whole"]);
    expect(body.results[2]).toMatchObject({ error: { code: "model_not_found" } });
    for (const r of body.results) {
      if (!("predictions" in r)) continue;
      const one = single.get(r.model) as Scores;
      expect(r.version).toBe(one.version);
      expect(r.predictions.map((p) => p.label)).toEqual(one.predictions.slice(0, 3).map((p) => p.label));
      for (const [i, p] of r.predictions.entries()) expect(Math.abs(p.score - (one.predictions[i]?.score as number))).toBeLessThan(1e-5);
    }
  });

  it("refuses a models list that cannot name models, and a request without a key, like single classify", async () => {
    const img = images[0] as (typeof images)[number];
    const post = (query: string, key = edge.apiKey) =>
      fetch(`${edge.url}/v1/classify${query}`, {
        method: "POST",
        headers: { authorization: `Bearer ${key}`, "content-type": "image/png" },
        body: img.bytes as BodyInit,
      });
    for (const q of ["?models=Bad!", "?models=a,,b", `?models=${Array.from({ length: 33 }, (_, i) => `m${i}`).join(",")}`]) {
      const res = await post(q);
      expect(res.status).toBe(422);
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe("invalid_models");
    }
    expect((await post("?models=head-a&top_k=0")).status).toBe(422);
    expect((await post("?models=head-a", "not-a-key")).status).toBe(401);
    const doc = (await (await fetch(`${edge.url}/openapi.json`)).json()) as { paths: Record<string, { post?: object }> };
    expect(doc.paths["/v1/classify"]?.post).toBeDefined();
  });

  it("refuses a head that names another base.json for a loaded base, and keeps serving the others", async () => {
    const a = await readPromotedModel(s3.store, "head-a");
    const split = a.metadata.split as NonNullable<typeof a.metadata.split>;
    const { files: _files, ...metadata } = a.metadata;
    const forged = await writeArtifact(
      s3.store,
      { ...metadata, name: "forged", split: { ...split, baseManifestSha256: "0".repeat(64) } },
      [...a.files.entries()].map(([path, bytes]) => ({ path, bytes })),
    );
    await writePointer(s3.store, "forged", {
      version: a.metadata.version,
      metadataSha256: forged.metadataSha256,
      promotedAt: new Date().toISOString(),
      previous: null,
      reason: "test",
    });
    const img = images[0] as (typeof images)[number];
    const res = await postClassify(edge, "forged", img);
    expect(res.status).toBe(503);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("model_unavailable");
    const h = await health(edge);
    expect((h.models.find((m) => m.name === "forged") as { problem?: string } | undefined)?.problem).toMatch(/base\.json/);
    expect((await postClassify(edge, "head-a", img)).status).toBe(200);
  });

  /** head-a's version published again as `name` (its own metadata naming it), its pointer's `served` from `serve`. */
  const republish = (
    name: string,
    serve: (metadata: Awaited<ReturnType<typeof readPromotedModel>>["metadata"]) => Served | undefined,
    change: Partial<Awaited<ReturnType<typeof readPromotedModel>>["metadata"]> = {},
  ) => publishCopy(s3.store, "head-a", name, { edit: (m) => ({ ...m, ...change }), serve });
  const problemOf = async (name: string) => (await health(edge)).models.find((m) => m.name === name) as { problem: string | null } | undefined;

  it("serves a pointer that lists the files to fetch beside the metadata, and one written before pointers did", async () => {
    // What training writes now: the pointer says the version is split, its head files and its base.
    const pointer = await readPointer(s3.store, "head-a");
    expect(pointer?.served?.form).toBe("split");
    expect(pointer?.served?.files.map((f) => f.path).sort()).toEqual(["class-means.bin", "head-shard1of1.bin", "head.json"]);
    await republish("listed", (m) => servedFiles(m));
    await republish("unlisted", () => undefined);
    const img = images[3] as (typeof images)[number];
    const one = (await (await postClassify(edge, "head-a", img)).json()) as Scores;
    for (const name of ["listed", "unlisted"]) {
      const res = await postClassify(edge, name, img);
      expect(res.status).toBe(200);
      const body = (await res.json()) as Scores;
      expect(body.predictions).toEqual(one.predictions);
    }
    const byName = new Map((await health(edge)).models.map((m) => [m.name, m]));
    expect(byName.get("listed")?.base).toBe(byName.get("head-a")?.base);
    expect(byName.get("unlisted")?.base).toBe(byName.get("head-a")?.base);
  });

  it("never serves the files a pointer lists when its metadata lists others: the metadata's are fetched instead", async () => {
    const b = await readPromotedModel(s3.store, "head-b");
    const otherShard = b.files.get("head-shard1of1.bin") as Uint8Array;
    const otherEntry = b.metadata.files.find((f) => f.path === "head-shard1of1.bin");
    // Another head's weights under this version's name, and a pointer that vouches for them.
    const metadata = await republish("swapped", (m) => {
      const served = servedFiles(m);
      return { ...served, files: served.files.map((f) => (f.path === "head-shard1of1.bin" ? { ...(otherEntry as typeof f) } : f)) };
    });
    await s3.store.put(keys.versionFile("swapped", metadata.version, "head-shard1of1.bin"), otherShard);
    // A split version whose pointer says it is whole (a writer's fault): served from its metadata's head.
    await republish("reformed", (m) => ({ form: "whole", files: m.files.filter((f) => f.path === "model.json" || f.path === "group1-shard1of1.bin") }));
    const img = images[0] as (typeof images)[number];
    const answer = async (name: string) => ((await (await postClassify(edge, name, img)).json()) as Scores).predictions;
    const [ofA, ofB] = [await answer("head-a"), await answer("head-b")];
    expect(ofA).not.toEqual(ofB);
    for (const name of ["swapped", "reformed"]) {
      const res = await postClassify(edge, name, img);
      expect(res.status).toBe(200);
      // head-a's answer: the weights its metadata's sha256 names (from the bucket, or the location's cache
      // that holds them by that sha256), never the other head's that the pointer vouched for.
      expect(((await res.json()) as Scores).predictions).toEqual(ofA);
      expect((await problemOf(name))?.problem).toMatch(/pointer \(current\.json\) does not list the files .* metadata does/);
    }
    expect((await health(edge)).bases).toHaveLength(1);
  });

  it("backs off a shared base that cannot be loaded once for all its heads, shown per base in /healthz", async () => {
    // Two heads naming a base that was never published.
    const missingBase = "f".repeat(64);
    const a = await readPromotedModel(s3.store, "head-a");
    const split = a.metadata.split as NonNullable<typeof a.metadata.split>;
    for (const name of ["orphan-1", "orphan-2"]) await republish(name, (m) => servedFiles(m), { base: { ...a.metadata.base, sha256: missingBase }, split });
    const img = images[0] as (typeof images)[number];
    for (const name of ["orphan-1", "orphan-2", "orphan-1"]) {
      const res = await postClassify(edge, name, img);
      expect(res.status).toBe(503);
      expect(Number(res.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    }
    const h = await health(edge);
    const broken = h.bases.filter((b) => b.sha256 === missingBase);
    // One entry for the base, one failure: the second head did not fetch it again.
    expect(broken).toHaveLength(1);
    expect(broken[0]).toMatchObject({ size: 96, heads: 0, failures: 1 });
    // Missing from the bucket; or, where the location's cache holds the real base.json by its sha256, not this base's.
    expect(broken[0]?.problem).toMatch(new RegExp(`_bases/${missingBase}-96/base\\.json`));
    expect(Date.parse(broken[0]?.retryAt as string)).toBeGreaterThan(Date.now());
    for (const name of ["orphan-1", "orphan-2"]) expect((await problemOf(name))?.problem).toMatch(new RegExp(`shared base ${missingBase}-96 cannot be loaded`));
    // The working base and its heads are untouched.
    expect((await postClassify(edge, "head-a", img)).status).toBe(200);
    expect((await health(edge)).bases.find((b) => b.sha256 === a.metadata.base.sha256)?.heads).toBeGreaterThan(0);
  });

  it("evicts the least recently used head under the memory budget and keeps the base its neighbour holds", async () => {
    // A budget below one base: every load evicts whatever else it can.
    const small = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 60, vars: { MODEL_MEMORY_MB: "1" } });
    try {
      const img = images[1] as (typeof images)[number];
      expect((await postClassify(small, "head-a", img)).status).toBe(200);
      const baseLoaded = (await health(small)).bases[0]?.loadedAt;
      expect((await postClassify(small, "head-b", img)).status).toBe(200);
      let h = await health(small);
      expect(h.models.filter((m) => m.version).map((m) => m.name)).toEqual(["head-b"]);
      // head-a is gone, but the base stayed: head-b holds it.
      expect(h.bases).toHaveLength(1);
      expect(h.bases[0]?.loadedAt).toBe(baseLoaded);
      expect(h.bases[0]?.heads).toBe(1);
      // head-a comes back on demand, on the same base copy.
      expect((await postClassify(small, "head-a", img)).status).toBe(200);
      h = await health(small);
      expect(h.bases[0]?.loadedAt).toBe(baseLoaded);
      expect(h.models.filter((m) => m.version).map((m) => m.name)).toEqual(["head-a"]);
    } finally {
      await small.stop();
    }
  });
});

describe("client keys limited to some models (API_KEYS entry key:modelA+modelB)", () => {
  const SCOPED = "scoped-client-key";
  const UNSCOPED = "unscoped-client-key";
  let scoped: EdgeWorker;
  beforeAll(async () => {
    // A fresh worker: what the scoped key asks is visible in its registry (/healthz), or not.
    scoped = await startEdgeWorker({
      s3Endpoint: s3.endpoint,
      bucket: s3.config.bucket,
      pointerTtlSeconds: 60,
      vars: { API_KEYS: `${UNSCOPED}, ${SCOPED}:head-a+whole` },
    });
  });
  afterAll(async () => {
    await scoped?.stop();
  });

  const as = (key: string) => ({ url: scoped.url, apiKey: key });
  const describeModel = (key: string, name: string) => fetch(`${scoped.url}/v1/models/${name}`, { headers: { authorization: `Bearer ${key}` } });
  const multi = (key: string, models: string) => {
    const img = images[0] as (typeof images)[number];
    return fetch(`${scoped.url}/v1/classify?models=${models}`, {
      method: "POST",
      headers: { authorization: `Bearer ${key}`, "content-type": img.file.endsWith(".jpg") ? "image/jpeg" : "image/png" },
      body: img.bytes as BodyInit,
    });
  };
  /** Status and body, the other model's name written as the missing one's (the only byte an answer may differ by). */
  const answerOf = async (res: Response, name = "nosuch") => `${res.status} ${(await res.text()).replaceAll(name, "nosuch")}`;

  it("answers an existing model outside the scope byte for byte as a missing one, without loading it", async () => {
    const img = images[0] as (typeof images)[number];
    expect((await postClassify(as(SCOPED), "head-a", img)).status).toBe(200);
    expect((await describeModel(SCOPED, "head-a")).status).toBe(200);
    const missing = await answerOf(await postClassify(as(SCOPED), "nosuch", img));
    expect(missing).toMatch(/^404 .*"model_not_found"/);
    expect(await answerOf(await postClassify(as(SCOPED), "head-b", img), "head-b")).toBe(missing);
    // The same answer an unscoped key gets for a model that does not exist.
    expect(await answerOf(await postClassify(as(UNSCOPED), "nosuch", img))).toBe(missing);
    const missingDescription = await answerOf(await describeModel(SCOPED, "nosuch"));
    expect(missingDescription).toMatch(/^404 /);
    expect(await answerOf(await describeModel(SCOPED, "head-b"), "head-b")).toBe(missingDescription);
    // Neither name reached the registry: nothing was looked up in storage, let alone loaded.
    const names = (await health(scoped)).models.map((m) => m.name);
    expect(names).toContain("head-a");
    expect(names).not.toContain("head-b");
    expect(names).not.toContain("nosuch");
  });

  it("answers each entry of a multi-model request outside the scope as a missing model", async () => {
    const res = await multi(SCOPED, "head-a,head-b,nosuch");
    expect(res.status).toBe(200);
    const { results } = (await res.json()) as { results: { model: string; predictions?: unknown; error?: unknown }[] };
    expect(results.map((r) => r.model)).toEqual(["head-a", "head-b", "nosuch"]);
    expect(results[0]?.predictions).toBeDefined();
    expect(JSON.stringify(results[1]).replaceAll("head-b", "nosuch")).toBe(JSON.stringify(results[2]));
    expect(results[2]).toMatchObject({ error: { code: "model_not_found" } });
    expect((await health(scoped)).models.map((m) => m.name)).not.toContain("head-b");
  });

  it("leaves a key without a scope free to use, and to tell apart, every model", async () => {
    const img = images[0] as (typeof images)[number];
    expect((await postClassify(as(UNSCOPED), "head-b", img)).status).toBe(200);
    expect((await describeModel(UNSCOPED, "head-b")).status).toBe(200);
    const { results } = (await (await multi(UNSCOPED, "head-a,head-b")).json()) as { results: { predictions?: unknown }[] };
    expect(results.every((r) => r.predictions)).toBe(true);
    // A scope is no key of its own, and an operator key stays unscoped.
    expect((await postClassify(as(`${SCOPED}:head-a+whole`), "head-a", img)).status).toBe(401);
    expect((await postClassify(scoped, "head-b", img)).status).toBe(200);
  });
});
