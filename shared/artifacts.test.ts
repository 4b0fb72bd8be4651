import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type LocalS3, startLocalS3 } from "../infra/local/s3-server.ts";
import { readMetadata, readPointer, readPromotedModel, readVerifiedFile, VersionExistsError, writeArtifact, writePointer } from "./artifacts.ts";
import { validMetadata } from "./contracts/fixtures.ts";
import { ContractError, IntegrityError, NotFoundError } from "./errors.ts";
import { keys } from "./keys.ts";
import type { ObjectReader } from "./s3/store.ts";

/** Contracts against a real S3 API server: write an artifact, read it back, reject tampering. */
let s3: LocalS3;
beforeAll(async () => {
  s3 = await startLocalS3();
});
afterAll(async () => {
  await s3?.stop();
});

const files = () => [
  { path: "model.json", bytes: new TextEncoder().encode('{"format":"layers-model"}') },
  { path: "group1-shard1of1.bin", bytes: new Uint8Array(4096).map((_, i) => i % 251) },
];

async function publish(name: string, version: string) {
  const { files: _ignored, ...meta } = { ...validMetadata(), name, version, dataset: { ...validMetadata().dataset, name } };
  const written = await writeArtifact(s3.store, meta, files());
  await writePointer(s3.store, name, { version, metadataSha256: written.metadataSha256, promotedAt: new Date().toISOString(), previous: null, reason: "test" });
  return written;
}

describe("model artifacts on S3", () => {
  it("round-trips a version through the pointer with every byte verified", async () => {
    await publish("roundtrip", "v000000000001");
    const model = await readPromotedModel(s3.store, "roundtrip");
    expect(model.metadata.version).toBe("v000000000001");
    expect(model.files.get("group1-shard1of1.bin")).toEqual(files()[1]?.bytes);
    expect(model.metadata.files.map((f) => f.path)).toEqual(["model.json", "group1-shard1of1.bin"]);
  });

  it("refuses to overwrite a version", async () => {
    await publish("immutable", "v000000000002");
    const { files: _f, ...meta } = { ...validMetadata(), name: "immutable", version: "v000000000002" };
    await expect(writeArtifact(s3.store, meta, files())).rejects.toBeInstanceOf(VersionExistsError);
  });

  it("rejects a tampered weight shard", async () => {
    await publish("tampered", "v000000000003");
    await s3.store.put(keys.versionFile("tampered", "v000000000003", "group1-shard1of1.bin"), new Uint8Array(4096));
    await expect(readPromotedModel(s3.store, "tampered")).rejects.toBeInstanceOf(IntegrityError);
  });

  it("rejects tampered metadata (the pointer carries its sha256)", async () => {
    await publish("tampered-meta", "v000000000004");
    const key = keys.metadata("tampered-meta", "v000000000004");
    const text = new TextDecoder().decode((await s3.store.get(key)) as Uint8Array);
    await s3.store.put(key, text.replace('"cat"', '"lion"'));
    await expect(readPromotedModel(s3.store, "tampered-meta")).rejects.toThrow(/corrupt or was tampered/);
  });

  it("reports a pointer to a missing version and a missing shard", async () => {
    await writePointer(s3.store, "dangling", {
      version: "v00000000dead",
      metadataSha256: "b".repeat(64),
      promotedAt: new Date().toISOString(),
      previous: null,
      reason: "x",
    });
    await expect(readPromotedModel(s3.store, "dangling")).rejects.toBeInstanceOf(NotFoundError);
    await publish("noshard", "v000000000005");
    await s3.store.delete([keys.versionFile("noshard", "v000000000005", "group1-shard1of1.bin")]);
    await expect(readPromotedModel(s3.store, "noshard")).rejects.toThrow(/missing/);
    expect(await readPointer(s3.store, "never-trained")).toBeNull();
  });

  it("rejects malformed metadata with the field named", async () => {
    await publish("malformed", "v000000000006");
    const key = keys.metadata("malformed", "v000000000006");
    const bad = JSON.parse(new TextDecoder().decode((await s3.store.get(key)) as Uint8Array));
    bad.labels = [];
    await s3.store.put(key, JSON.stringify(bad));
    const err = await readMetadata(s3.store, "malformed", "v000000000006").catch((e) => e);
    expect(err).toBeInstanceOf(ContractError);
    expect((err as ContractError).field).toBe("labels");
  });
});

describe("verified bytes cache", () => {
  const memoryCache = () => {
    const entries = new Map<string, Uint8Array>();
    return { entries, get: async (sha: string) => entries.get(sha) ?? null, put: async (sha: string, bytes: Uint8Array) => void entries.set(sha, bytes) };
  };

  it("serves verified bytes from the cache, refetches a corrupt entry, and never caches tampered bytes", async () => {
    const written = await publish("cached", "v0000000000c1");
    const cache = memoryCache();
    const metadata = await readMetadata(s3.store, "cached", "v0000000000c1", written.metadataSha256, cache);
    const shard = metadata.files.find((f) => f.path === "group1-shard1of1.bin") as { sha256: string };
    expect(await readVerifiedFile(s3.store, metadata, "group1-shard1of1.bin", cache)).toEqual(files()[1]?.bytes);
    expect([...cache.entries.keys()].sort()).toEqual([written.metadataSha256, shard.sha256].sort());

    // Hits need no storage at all.
    const nowhere: ObjectReader = { get: async () => Promise.reject(new Error("storage should not be asked")) };
    expect(await readVerifiedFile(nowhere, metadata, "group1-shard1of1.bin", cache)).toEqual(files()[1]?.bytes);
    expect((await readMetadata(nowhere, "cached", "v0000000000c1", written.metadataSha256, cache)).version).toBe("v0000000000c1");

    // A corrupt entry is a miss: the bytes come from storage, verified, and replace it.
    cache.entries.set(shard.sha256, new Uint8Array([1, 2, 3]));
    expect(await readVerifiedFile(s3.store, metadata, "group1-shard1of1.bin", cache)).toEqual(files()[1]?.bytes);
    expect(cache.entries.get(shard.sha256)).toEqual(files()[1]?.bytes);

    // Tampered storage with an empty cache: refused, and nothing is cached.
    const empty = memoryCache();
    await s3.store.put(keys.versionFile("cached", "v0000000000c1", "group1-shard1of1.bin"), new Uint8Array(4096));
    await expect(readVerifiedFile(s3.store, metadata, "group1-shard1of1.bin", empty)).rejects.toBeInstanceOf(IntegrityError);
    expect(empty.entries.size).toBe(0);
  });
});
