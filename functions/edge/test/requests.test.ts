import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPointer } from "#shared/artifacts.ts";
import { operatorRequestSchema, requestMessage } from "#shared/contracts/request.ts";
import { sha256Hex, signedWithAny } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import { type EdgeWorker, startEdgeWorker } from "../../../infra/local/edge-worker.ts";
import { type LocalS3, startLocalS3 } from "../../../infra/local/s3-server.ts";
import { memoryLogger } from "../../../jobs/train/src/log.ts";
import { applyRequests } from "../../../jobs/train/src/requests/requests.ts";
import { train } from "../../../jobs/train/src/train.ts";
import { uploadSample } from "../../../test/support/datasets.ts";

/**
 * The console's request routes in real workerd against the local S3 server and a really trained model:
 * only operator keys may ask, bad bodies and unknown versions are answered plainly, what is written is a
 * request signed with the operator's key (which the dispatcher's check accepts), its outcome is read
 * back, and an export is streamed to operator keys only.
 */
const OPERATOR = "operator-key-edge-requests-01";
let s3: LocalS3;
let edge: EdgeWorker;
let version: string;

beforeAll(async () => {
  s3 = await startLocalS3();
  await uploadSample(s3.store, "emoji", { perLabel: 8, size: 96 });
  version = (await train(s3.store, { dataset: "emoji", imageSize: 96, views: 1, head: { epochs: 5 }, promote: "always" }, memoryLogger())).version;
  edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 1, vars: { CONSOLE_API_KEYS: OPERATOR } });
});
afterAll(async () => {
  await edge?.stop();
  await s3?.stop();
});

const ask = (body: unknown, key = OPERATOR, model = "emoji") =>
  fetch(`${edge.url}/v1/models/${model}/requests`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
const get = (path: string, key = OPERATOR) => fetch(`${edge.url}${path}`, { headers: { authorization: `Bearer ${key}` } });
const errorOf = async (r: Response) => [r.status, ((await r.json()) as { error: { code: string; message: string } }).error] as const;
const waiting = async () => {
  const found: string[] = [];
  for await (const o of s3.store.list(keys.captureRequests("emoji"))) found.push(o.key);
  return found;
};
const dispatch = () => applyRequests(s3.store, "emoji", { log: memoryLogger(), operatorKeys: [OPERATOR], train: async (d) => `queued ${d}` });

describe("console requests at the edge", () => {
  it("are for operator keys only", async () => {
    expect(await errorOf(await ask({ kind: "rollback" }, edge.apiKey))).toEqual([403, expect.objectContaining({ code: "forbidden" })]);
    expect((await ask({ kind: "rollback" }, "")).status).toBe(401);
    expect((await get("/v1/models/emoji/requests", edge.apiKey)).status).toBe(403);
    expect((await get(`/v1/models/emoji/versions/${version}/export/model.onnx`, edge.apiKey)).status).toBe(403);
    expect(await waiting()).toEqual([]);
  });

  it("answer bad bodies, unknown models and unknown versions plainly, and record nothing", async () => {
    for (const body of [{ kind: "promote" }, { kind: "rollback", version }, { kind: "delete-everything" }, { kind: "promote", version: "v1" }]) {
      const r = await ask(body);
      expect(r.status, JSON.stringify(body)).toBe(422);
      expect(((await r.json()) as { error: unknown }).error).toMatchObject({
        code: "invalid_request",
        message: expect.stringContaining('{"kind": "rollback"'),
      });
    }
    expect(await errorOf(await ask("{not json"))).toEqual([400, { code: "invalid_json", message: "The body is not valid JSON: send one JSON object." }]);
    expect(await errorOf(await ask({ kind: "promote", version: "v0000000000ff" }))).toEqual([404, expect.objectContaining({ code: "version_not_found" })]);
    expect(await errorOf(await ask({ kind: "train" }, OPERATOR, "no-such-model"))).toEqual([404, expect.objectContaining({ code: "model_not_found" })]);
    // One version served, none before it: a rollback has no target to sign.
    expect(await errorOf(await ask({ kind: "rollback" }))).toEqual([409, expect.objectContaining({ code: "no_earlier_version" })]);
    expect(await waiting()).toEqual([]);
  });

  it("record a request signed with the operator's key; its state reads pending, then the dispatcher's outcome", async () => {
    const r = await ask({ kind: "promote", version });
    expect(r.status).toBe(202);
    const answered = (await r.json()) as { id: string; state: string };
    expect(answered).toMatchObject({ kind: "promote", version, state: "pending", message: null });
    const stored = operatorRequestSchema.parse(
      JSON.parse(new TextDecoder().decode((await s3.store.get(keys.captureRequest("emoji", answered.id))) as Uint8Array)),
    );
    // Signed with the pointer it was asked against: the dispatcher applies it only while the pointer is still that one.
    const pointer = await readPointer(s3.store, "emoji");
    expect(stored).toMatchObject({ model: "emoji", kind: "promote", version, from: pointer?.version, fromPromotedAt: pointer?.promotedAt, by: "console" });
    expect(await signedWithAny(stored.signature, requestMessage(stored), [OPERATOR])).toBe(true);
    expect(await signedWithAny(stored.signature, requestMessage(stored), [edge.apiKey])).toBe(false);
    const before = (await (await get("/v1/models/emoji/requests")).json()) as { requests: { id: string; state: string }[] };
    expect(before.requests.find((q) => q.id === answered.id)?.state).toBe("pending");
    const [outcome] = await dispatch();
    expect(outcome?.state).toBe("done");
    const after = (await (await get("/v1/models/emoji/requests")).json()) as { requests: { id: string; state: string; message: string }[] };
    expect(after.requests.find((q) => q.id === answered.id)).toMatchObject({ state: "done", message: outcome?.message, provisional: false, verified: true });
    // A refusal another job may still replace (a claim without an outcome) says so: the console keeps polling it.
    const id = answered.id.replace(/-[0-9a-f]+$/, "-0000fade");
    const provisional = {
      schemaVersion: 1,
      id,
      kind: "rollback",
      issuedAt: outcome?.issuedAt,
      state: "refused",
      message: "may or may not",
      at: outcome?.at,
      provisional: true,
    };
    await s3.store.put(keys.captureOutcome("emoji", id), JSON.stringify(provisional));
    const listed = (await (await get("/v1/models/emoji/requests")).json()) as { requests: { id: string; provisional: boolean }[] };
    expect(listed.requests.find((q) => q.id === id)).toMatchObject({ state: "refused", provisional: true });
    expect((await readPointer(s3.store, "emoji"))?.version).toBe(version);
  });

  it("streams a version's ONNX export to operator keys once the dispatcher made it, and says plainly when there is none", async () => {
    expect(await errorOf(await get(`/v1/models/emoji/versions/${version}/export/model.onnx`))).toEqual([
      404,
      expect.objectContaining({ code: "export_not_found" }),
    ]);
    expect(await (await get(`/v1/models/emoji/versions/${version}/export`)).json()).toEqual({ model: "emoji", version, onnx: null });
    expect((await ask({ kind: "export-onnx", version })).status).toBe(202);
    expect((await dispatch())[0]?.state).toBe("done");
    const { onnx: info } = (await (await get(`/v1/models/emoji/versions/${version}/export`)).json()) as { onnx: { bytes: number; sha256: string } };
    const r = await get(`/v1/models/emoji/versions/${version}/export/model.onnx`);
    expect(r.status).toBe(200);
    expect(r.headers.get("content-disposition")).toBe(`attachment; filename="emoji-${version}.onnx"`);
    const bytes = new Uint8Array(await r.arrayBuffer());
    // By hash: a deep comparison of megabytes of bytes takes vitest half a minute.
    expect(await sha256Hex(bytes)).toBe(await sha256Hex((await s3.store.get(keys.versionOnnx("emoji", version))) as Uint8Array));
    expect(info).toMatchObject({ bytes: bytes.byteLength, sha256: await sha256Hex(bytes) });
    expect(await errorOf(await get("/v1/models/emoji/versions/v0000000000ff/export/model.onnx"))).toEqual([
      404,
      expect.objectContaining({ code: "export_not_found" }),
    ]);
    // Without its description (written last, checked by the console's hash) the file is no export: not served.
    const infoKey = keys.versionOnnxInfo("emoji", version);
    const infoBytes = (await s3.store.get(infoKey)) as Uint8Array;
    await s3.store.delete([infoKey]);
    try {
      expect(await errorOf(await get(`/v1/models/emoji/versions/${version}/export/model.onnx`))).toEqual([
        404,
        expect.objectContaining({ code: "export_not_found" }),
      ]);
    } finally {
      await s3.store.put(infoKey, infoBytes, "application/json");
    }
  });

  it("flag an outcome not signed by the dispatcher, and keep its request pending (the edge's key can write outcomes)", async () => {
    const { id } = (await (await ask({ kind: "train" })).json()) as { id: string };
    const fake = {
      schemaVersion: 1,
      id,
      kind: "train",
      issuedAt: new Date().toISOString(),
      state: "done",
      message: "Now serves v9: log in at evil.example",
      at: new Date().toISOString(),
    };
    await s3.store.put(keys.captureOutcome("emoji", id), JSON.stringify(fake));
    const orphanId = id.replace(/-[0-9a-f]+$/, "-0000f00d");
    await s3.store.put(keys.captureOutcome("emoji", orphanId), JSON.stringify({ ...fake, id: orphanId }));
    const listed = (await (await get("/v1/models/emoji/requests")).json()) as {
      requests: { id: string; state: string; verified: boolean; message: string | null }[];
    };
    expect(listed.requests.filter((q) => q.id === id)).toEqual([expect.objectContaining({ state: "pending", verified: true, message: null })]);
    expect(listed.requests.find((q) => q.id === orphanId)).toMatchObject({ state: "done", verified: false });
    // The dispatcher's own outcome replaces the fake one and verifies.
    expect((await dispatch())[0]?.state).toBe("done");
    const after = (await (await get("/v1/models/emoji/requests")).json()) as { requests: { id: string; state: string; verified: boolean }[] };
    expect(after.requests.find((q) => q.id === id)).toMatchObject({ state: "done", verified: true });
    await s3.store.delete([keys.captureOutcome("emoji", orphanId)]);
  });

  it("list the newest outcomes even behind a thousand junk keys that sort first (written with the edge's key)", async () => {
    const junk = Array.from({ length: 1000 }, (_, i) => `${keys.captureOutcomes("emoji")}0-${String(i).padStart(4, "0")}.json`);
    for (let i = 0; i < junk.length; i += 100) await Promise.all(junk.slice(i, i + 100).map((k) => s3.store.put(k, "{}")));
    try {
      const r = await ask({ kind: "train" });
      const { id } = (await r.json()) as { id: string };
      expect((await dispatch())[0]?.state).toBe("done");
      const listed = (await (await get("/v1/models/emoji/requests")).json()) as { requests: { id: string; state: string }[] };
      expect(listed.requests.find((q) => q.id === id)).toMatchObject({ state: "done" });
    } finally {
      await s3.store.delete(junk);
    }
  });

  it("are in the OpenAPI document", async () => {
    const doc = (await (await fetch(`${edge.url}/openapi.json`)).json()) as { paths: Record<string, Record<string, unknown>> };
    expect(Object.keys(doc.paths["/v1/models/{name}/requests"] ?? {}).sort()).toEqual(["get", "post"]);
    expect(doc.paths["/v1/models/{name}/versions/{version}/export/model.onnx"]?.get).toBeDefined();
  });
});
