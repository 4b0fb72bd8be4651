import { afterEach, describe, expect, it, vi } from "vitest";
import { servedFiles } from "#shared/contracts/artifact.ts";
import { validMetadata } from "#shared/contracts/fixtures.ts";
import { sha256Hex } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import { fakeSource } from "../../../../test/support/model-source.ts";
import { BASE_PROBLEM } from "./bases.ts";
import { ModelRegistry, ModelUnavailableError } from "./registry.ts";

// The registry's storage boundary is faked here; loading a real model in workerd is edge.test.ts's job.
// Nothing below reaches TensorFlow: every load fails before it (that is what is tested).
vi.mock("../tf.ts", () => ({ tf: {}, initTf: async () => {} }));

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

  it("keeps a broken model's back-off when made-up names fill the registry", async () => {
    const { source, put, getsOf } = fakeSource();
    brokenModel(put);
    const now = 2_000_000;
    const registry = new ModelRegistry(source, { ttlMs: 30_000, memoryBudgetBytes: 64 * 1024 * 1024, now: () => now });
    await unavailable(registry);
    const metadata = keys.metadata("m", "v0123456789ab");
    expect(getsOf(metadata)).toBe(1);
    // Names that do not exist, more than the registry remembers: it forgets some, not the broken model's back-off.
    for (let i = 0; i < 300; i++) await expect(registry.acquire(`nope-${i}`, () => {})).rejects.toMatchObject({ code: "model_not_found" });
    await unavailable(registry);
    expect(getsOf(keys.pointer("m"))).toBe(1);
    expect(getsOf(metadata)).toBe(1);
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
    // A client key is told the base failed, not which base it is or where it is stored: that is /healthz's.
    expect(first.message).toBe(`Model h1 is not available yet: ${BASE_PROBLEM}.`);
    expect(registry.status().find((m) => m.name === "h1")?.lastError).toMatch(/shared base b+-128 cannot be loaded: .*_bases\/b+-128\/base\.json/);
    expect(getsOf(manifest)).toBe(1);
    // The other head, and both again: refused from what is known, the base not asked for again.
    for (const name of ["h2", "h1", "h2"]) expect((await acquire(name)).message).toContain(BASE_PROBLEM);
    expect(getsOf(manifest)).toBe(1);
    const [failed] = registry.basesStatus();
    expect(failed).toMatchObject({ sha256: baseSha, size: 128, heads: 0, failures: 1 });
    expect(failed?.problem).toMatch(/missing/);
    // Past the base's back-off (≈ 4 s), the first head that asks tries the base again, once.
    now += 4_100;
    for (const name of ["h2", "h1"]) await acquire(name);
    expect(getsOf(manifest)).toBe(2);
    expect(registry.basesStatus()[0]).toMatchObject({ failures: 2 });
  });
});
