import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { listModelsPage } from "#shared/catalog.ts";
import { keys } from "#shared/keys.ts";
import { ObjectTooLargeError } from "#shared/s3/store.ts";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import { type FaultProxy, startFaultProxy } from "../../../../test/support/fault-proxy.ts";
import { createModelSource, type ModelSource } from "./source.ts";

/**
 * The worker's signed-fetch store against the local S3 server, through a proxy that only records the
 * requests: reads bounded by `maxBytes`, and the models list read a page at a time (not the whole bucket).
 */
let s3: LocalS3;
let proxy: FaultProxy;
let source: ModelSource;
const lists = () => proxy.requests.filter((r) => r.method === "GET" && r.path.includes("list-type=2")).length;

beforeAll(async () => {
  s3 = await startLocalS3();
  proxy = await startFaultProxy(s3.endpoint, { every: Number.MAX_SAFE_INTEGER });
  const { credentials, bucket } = s3.config;
  source = createModelSource({
    S3_BUCKET: bucket,
    S3_ENDPOINT: proxy.endpoint,
    AWS_ACCESS_KEY_ID: credentials?.accessKeyId,
    AWS_SECRET_ACCESS_KEY: credentials?.secretAccessKey,
  });
});
afterAll(async () => {
  await proxy?.stop();
  await s3?.stop();
});

describe("the worker's model source", () => {
  it("never holds more than maxBytes of an object, and reads one within it whole", async () => {
    const body = new Uint8Array(256 * 1024).fill(3);
    await s3.store.put("models/m/v0123456789ab/report.json", body);
    await expect(source.get("models/m/v0123456789ab/report.json", { maxBytes: 1000 })).rejects.toBeInstanceOf(ObjectTooLargeError);
    await expect(source.get("models/m/v0123456789ab/report.json", { maxBytes: body.length - 1 })).rejects.toBeInstanceOf(ObjectTooLargeError);
    expect((await source.get("models/m/v0123456789ab/report.json", { maxBytes: body.length }))?.length).toBe(body.length);
    expect((await source.get("models/m/v0123456789ab/report.json"))?.length).toBe(body.length);
    expect(await source.get("models/m/v0123456789ab/missing.json", { maxBytes: 10 })).toBeNull();
    await s3.store.delete(["models/m/v0123456789ab/report.json"]);
  });

  it("lists a page of models with one LIST however many there are, in the bucket's order, each once", async () => {
    // 1100 models: more than one LIST page (1000 folders); S3 orders `a-b/` and `a.b/` before `a/`.
    const names = [...Array.from({ length: 1096 }, (_, i) => `n${String(i).padStart(4, "0")}`), "a", "a-b", "a.b", "a0"];
    for (let i = 0; i < names.length; i += 100) await Promise.all(names.slice(i, i + 100).map((n) => s3.store.put(`${keys.model(n)}current.json`, "{}")));
    await s3.store.put(`${keys.sharedBasesRoot}x-96/base.json`, "{}");

    let before = lists();
    const first = await listModelsPage(source, 3);
    expect(first).toEqual({ names: ["a-b", "a.b", "a"], more: true });
    expect(lists() - before).toBe(1);
    // After "a": not a again (its own keys sort before models/a0), then a0 and the n….
    before = lists();
    const second = await listModelsPage(source, 3, "a");
    expect(second).toEqual({ names: ["a0", "n0000", "n0001"], more: true });
    expect(lists() - before).toBe(1);
    // The last page, past the first 1000 folders: _bases is not a model.
    before = lists();
    const last = await listModelsPage(source, 20, "n1090");
    expect(last).toEqual({ names: ["n1091", "n1092", "n1093", "n1094", "n1095"], more: false });
    expect(lists() - before).toBe(1);
    const all: string[] = [];
    for (let after: string | undefined, more = true; more; ) {
      const page = await listModelsPage(source, 400, after);
      all.push(...page.names);
      [after, more] = [page.names.at(-1), page.more];
    }
    expect(all).toEqual(["a-b", "a.b", "a", "a0", ...names.slice(0, 1096)]);
  });
});
