import { afterEach, describe, expect, it, vi } from "vitest";
import { servedFiles } from "#shared/contracts/artifact.ts";
import { validMetadata } from "#shared/contracts/fixtures.ts";
import { sha256Hex } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import { ModelRegistry, ModelUnavailableError } from "./registry.ts";
import type { ConditionalResult, ModelSource } from "./source.ts";

// The registry's storage boundary is faked here; loading a real model in workerd is edge.test.ts's job.
// Nothing below reaches TensorFlow: every load fails before it (that is what is tested).
vi.mock("../tf.ts", () => ({ tf: {}, initTf: async () => {} }));

/** An in-memory bucket that counts GETs, and can fail every request like an S3 outage. */
function fakeSource() {
  const objects = new Map<string, Uint8Array>();
  const state = { gets: 0, down: false, keys: [] as string[] };
  const source: ModelSource = {
    async *listFolders() {},
    async get(key) {
      return (await source.getIfChanged(key)).bytes ?? null;
    },
    async getIfChanged(key, etag): Promise<ConditionalResult> {
      state.gets++;
      state.keys.push(key);
      if (state.down) throw new Error("S3 answered 500 InternalError");
      const bytes = objects.get(key);
      if (!bytes) return { status: 404 };
      const tag = `"${(await sha256Hex(bytes)).slice(0, 16)}"`;
      return tag === etag ? { status: 304, etag } : { status: 200, bytes, etag: tag };
    },
  };
  const put = (key: string, value: unknown) => objects.set(key, new TextEncoder().encode(JSON.stringify(value)));
  const getsOf = (key: string) => state.keys.filter((k) => k === key).length;
  return { source, state, put, objects, getsOf };
}

/** A pointer to a version whose metadata does not match the pointer's sha256 (tampered or half-written). */
function brokenModel(put: (key: string, value: unknown) => void) {
  put(keys.pointer("m"), {
    schemaVersion: 1,
    version: "v0123456789ab",
    metadataSha256: "0".repeat(64),
    promotedAt: new Date(0).toISOString(),
    previous: null,
    reason: "test",
  });
  put(keys.metadata("m", "v0123456789ab"), { not: "the metadata the pointer vouches for" });
}

async function unavailable(registry: ModelRegistry): Promise<ModelUnavailableError> {
  const e = await registry.acquire("m", () => {}).catch((err: unknown) => err);
  expect(e).toBeInstanceOf(ModelUnavailableError);
  return e as ModelUnavailableError;
}

afterEach(() => {
  vi.restoreAllMocks();
});

describe("model registry back-off", () => {
  it("does not fetch a broken model again on every request; retries after a jittered back-off", async () => {
    vi.spyOn(Math, "random").mockReturnValue(0.999); // the longest jitter: back-offs of ≈ 1 s and 2 s

    const { source, state, put } = fakeSource();
    brokenModel(put);
    let now = 1_000_000;
    const registry = new ModelRegistry(source, { ttlMs: 30_000, memoryBudgetBytes: 64 * 1024 * 1024, now: () => now });
    const first = await unavailable(registry);
    expect(first.code).toBe("model_unavailable");
    expect(first.message).toMatch(/tampered|does not match/);
    expect(state.gets).toBe(2); // the pointer and the metadata
    for (let i = 0; i < 10; i++) expect((await unavailable(registry)).retryAfterSeconds).toBe(1);
    expect(state.gets).toBe(2);
    // After the first back-off (1 s) the pointer is asked for again; its version, which failed with this
    // very pointer, is not fetched again until its own back-off (2 s) has passed.
    now += 1_001;
    await unavailable(registry);
    expect(state.gets).toBe(3);
    now += 1_001;
    await unavailable(registry);
    expect(state.gets).toBe(5); // pointer + metadata
  });

  it("asks an S3 that is down once, not once per request, and says when to come back", async () => {
    const { source, state, put } = fakeSource();
    brokenModel(put);
    state.down = true;
    let now = 5_000_000;
    const registry = new ModelRegistry(source, { ttlMs: 30_000, memoryBudgetBytes: 64 * 1024 * 1024, now: () => now });
    for (let i = 0; i < 20; i++) await unavailable(registry);
    expect(state.gets).toBe(1);
    // Failures in a row back off further: 0.5–1 s, then 1–2 s, then 2–4 s.
    for (const [wait, gets] of [
      [1_001, 2],
      [2_001, 3],
      [4_001, 4],
    ] as const) {
      now += wait - 1;
      await unavailable(registry);
      now += 1;
      await unavailable(registry);
      expect(state.gets).toBe(gets);
    }
  });

  it("backs off a broken shared base once for every head on it, and retries it for all of them", async () => {
    vi.spyOn(Math, "random").mockReturnValue(0.999); // the longest jitter: the base's first back-off is ≈ 4 s
    const { source, objects, getsOf } = fakeSource();
    const baseSha = "b".repeat(64);
    const manifest = keys.sharedBaseFile(baseSha, 128, "base.json");
    // Two split versions (heads) naming one base whose base.json is missing: one with a pointer that lists
    // what to fetch (`served`), one written before pointers did.
    const headJson = new TextEncoder().encode(JSON.stringify({ modelTopology: {}, weightsManifest: [{ paths: ["head-shard1of1.bin"], weights: [] }] }));
    const shard = new Uint8Array(8);
    for (const [name, listed] of [
      ["h1", true],
      ["h2", false],
    ] as const) {
      const fixture = validMetadata();
      const files = [
        ...fixture.files,
        { path: "head.json", sha256: await sha256Hex(headJson), bytes: headJson.byteLength },
        { path: "head-shard1of1.bin", sha256: await sha256Hex(shard), bytes: shard.byteLength },
      ];
      const metadata = { ...fixture, name, base: { ...fixture.base, sha256: baseSha }, files, split: { baseManifestSha256: "c".repeat(64), features: 8 } };
      const text = new TextEncoder().encode(JSON.stringify(metadata));
      objects.set(keys.metadata(name, metadata.version), text);
      objects.set(keys.versionFile(name, metadata.version, "head.json"), headJson);
      objects.set(keys.versionFile(name, metadata.version, "head-shard1of1.bin"), shard);
      const pointer = {
        schemaVersion: 1,
        version: metadata.version,
        metadataSha256: await sha256Hex(text),
        promotedAt: new Date(0).toISOString(),
        previous: null,
        reason: "test",
        ...(listed ? { served: servedFiles(metadata) } : {}),
      };
      objects.set(keys.pointer(name), new TextEncoder().encode(JSON.stringify(pointer)));
    }
    let now = 9_000_000;
    const registry = new ModelRegistry(source, { ttlMs: 30_000, memoryBudgetBytes: 64 * 1024 * 1024, now: () => now });
    const acquire = (name: string) =>
      registry
        .acquire(name, () => {})
        .then(
          () => {
            throw new Error(`${name} was served`);
          },
          (e: unknown) => e as ModelUnavailableError,
        );
    const first = await acquire("h1");
    expect(first).toBeInstanceOf(ModelUnavailableError);
    expect(first.message).toMatch(/shared base b+-128 cannot be loaded/);
    expect(getsOf(manifest)).toBe(1);
    // The other head, and both again: refused from what is known, the base not asked for again.
    for (const name of ["h2", "h1", "h2"]) expect((await acquire(name)).message).toMatch(/shared base/);
    expect(getsOf(manifest)).toBe(1);
    const [failed] = registry.bases.status();
    expect(failed).toMatchObject({ sha256: baseSha, size: 128, heads: 0, failures: 1 });
    expect(failed?.problem).toMatch(/missing/);
    // Past the base's back-off (≈ 4 s), the first head that asks tries the base again, once.
    now += 4_100;
    for (const name of ["h2", "h1"]) await acquire(name);
    expect(getsOf(manifest)).toBe(2);
    expect(registry.bases.status()[0]).toMatchObject({ failures: 2 });
  });
});
