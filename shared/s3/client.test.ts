import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type LocalS3, startLocalS3 } from "../../infra/local/s3-server.ts";
import { type FaultProxy, startFaultProxy } from "../../test/support/fault-proxy.ts";
import { S3ObjectStore, StorageError } from "./client.ts";
import { ObjectTooLargeError } from "./store.ts";

/**
 * The one S3 put path against the local S3 server, whose request limit (≈ 11 MiB) a fine-tuning
 * checkpoint of a MobileNetV2 exceeds: large objects must go up in parts.
 */
let s3: LocalS3;
let proxy: FaultProxy;
let store: S3ObjectStore;
const BIG = 12 * 1024 * 1024 + 123; // over the server's request limit, and not a whole number of parts

beforeAll(async () => {
  s3 = await startLocalS3();
  // A proxy that injects nothing (every: a huge number): it only records the requests.
  proxy = await startFaultProxy(s3.endpoint, { every: Number.MAX_SAFE_INTEGER });
  store = new S3ObjectStore({ ...s3.config, endpoint: proxy.endpoint });
});
afterAll(async () => {
  await proxy?.stop();
  await s3?.stop();
});

describe("S3 object store", () => {
  it("stores an object over the server's request limit as a multipart upload, byte for byte", async () => {
    const body = new Uint8Array(randomBytes(BIG));
    proxy.requests.length = 0;
    await store.put("runs/x/finetune-e1.bin", body);
    const methods = proxy.requests.map((r) => `${r.method} ${r.path.replace(/uploadId=[^&]+/, "uploadId=…")}`);
    expect(methods.filter((m) => /^POST .*\?uploads/.test(m))).toHaveLength(1);
    expect(methods.filter((m) => /^PUT .*partNumber=\d/.test(m))).toHaveLength(2);
    expect(methods.filter((m) => /^POST .*uploadId=/.test(m))).toHaveLength(1); // complete
    const back = (await store.get("runs/x/finetune-e1.bin")) as Uint8Array;
    expect(back.byteLength).toBe(BIG);
    expect(Buffer.from(back).equals(Buffer.from(body))).toBe(true);
    expect((await store.head("runs/x/finetune-e1.bin"))?.size).toBe(BIG);
  });

  it("keeps a small object a single PUT", async () => {
    proxy.requests.length = 0;
    await store.put("models/x/metadata.json", JSON.stringify({ ok: true }));
    expect(proxy.requests.map((r) => r.method)).toEqual(["PUT"]);
  });

  it("says in plain words which operation failed and the server's HTTP status, not the SDK's XML parse error", async () => {
    // A single conditional PUT over the request limit: the local server answers 413 with a body that is not S3's XML.
    const err = await s3.store.putIfAbsent("models/x/huge.json", new Uint8Array(BIG)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(StorageError);
    expect((err as Error).message).toBe("Storing models/x/huge.json in the bucket failed (S3 PUT): the storage server answered HTTP 413 Payload Too Large.");
    const missing = new S3ObjectStore({ ...s3.config, bucket: "no-such-bucket" });
    const err2 = await missing.put("a.json", "{}").catch((e: unknown) => e);
    expect((err2 as Error).message).toMatch(
      /^Storing a\.json in the bucket failed \(S3 PUT\): the storage server answered HTTP 404 Not Found \(NoSuchBucket\)\.$/,
    );
    // Nothing listening: the connection, in words.
    const closed = new S3ObjectStore({ ...s3.config, endpoint: "http://127.0.0.1:9" });
    const err3 = await closed.get("a.json").catch((e: unknown) => e);
    expect((err3 as Error).message).toBe("Reading a.json in the bucket failed (S3 GET): the storage server could not be reached (ECONNREFUSED).");
  });
});

describe("a capped get", () => {
  it("refuses an object larger than allowed, whatever a listing said before, and reads the rest whole", async () => {
    const big = new Uint8Array(3 * 1024 * 1024).fill(7);
    await s3.store.put("captures/m/decisions/x.json", new Uint8Array(10));
    const listed = [];
    for await (const o of s3.store.list("captures/m/decisions/")) listed.push(o);
    expect(listed[0]?.size).toBe(10);
    // Replaced between the listing and the read (the edge's key may write there).
    await s3.store.put("captures/m/decisions/x.json", big);
    await expect(s3.store.get("captures/m/decisions/x.json", { maxBytes: 4096 })).rejects.toBeInstanceOf(ObjectTooLargeError);
    await expect(s3.store.get("captures/m/decisions/x.json", { maxBytes: big.length - 1 })).rejects.toBeInstanceOf(ObjectTooLargeError);
    expect((await s3.store.get("captures/m/decisions/x.json", { maxBytes: big.length }))?.length).toBe(big.length);
    await s3.store.put("captures/m/empty.json", new Uint8Array());
    expect(await s3.store.get("captures/m/empty.json", { maxBytes: 16 })).toEqual(new Uint8Array());
    expect(await s3.store.get("captures/m/missing.json", { maxBytes: 16 })).toBeNull();
  });
});
