import * as tfl from "@tensorflow/tfjs-layers";
import { afterEach, describe, expect, it, vi } from "vitest";
import type { ArtifactMetadata } from "#shared/contracts/artifact.ts";
import { servedFiles } from "#shared/contracts/artifact.ts";
import { validMetadata } from "#shared/contracts/fixtures.ts";
import { sha256Hex } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import { fakeSource } from "../../../../test/support/model-source.ts";
import { tf } from "../tf.ts";
import { ModelRegistry, ModelUnavailableError } from "./registry.ts";

// Real tfjs models (tiny, on tfjs's CPU backend in Node) behind a fake bucket: what is fetched, held and
// reported when heads share a base. Loading real split versions in workerd is many-models.test.ts's job.
vi.mock("../tf.ts", async () => {
  const tf = await import("@tensorflow/tfjs-core");
  await import("@tensorflow/tfjs-backend-cpu");
  await tf.setBackend("cpu");
  tf.env().set("IS_TEST", true); // no "install the node backend" banner in the test output
  return { tf, initTf: async () => {} };
});

const SIZE = 96;
const enc = (value: unknown) => new TextEncoder().encode(JSON.stringify(value));

/** A model's model.json (one shard, `shard`) and that shard's bytes. */
async function exported(model: tfl.LayersModel, shard: string): Promise<{ json: Uint8Array; weights: Uint8Array }> {
  let out: { json: Uint8Array; weights: Uint8Array } | undefined;
  await model.save(
    tf.io.withSaveHandler(async (a) => {
      const json = { modelTopology: a.modelTopology, weightsManifest: [{ paths: [shard], weights: a.weightSpecs }] };
      out = { json: enc(json), weights: new Uint8Array(a.weightData as ArrayBuffer) };
      return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: "JSON" } };
    }),
  );
  model.dispose();
  return out as { json: Uint8Array; weights: Uint8Array };
}

const fileOf = async (path: string, bytes: Uint8Array) => ({ path, sha256: await sha256Hex(bytes), bytes: bytes.byteLength });

/** A bucket holding one shared base (a strided conv, 4 channels at `feat`) and helpers to publish heads on it. */
async function bucket() {
  const fake = fakeSource();
  const { objects } = fake;
  const baseSha = "b".repeat(64);
  const base = await exported(
    tfl.sequential({ layers: [tfl.layers.conv2d({ inputShape: [SIZE, SIZE, 3], filters: 4, kernelSize: 3, strides: 16, name: "feat" })] }),
    "group1-shard1of1.bin",
  );
  const baseFile = (p: string) => keys.sharedBaseFile(baseSha, SIZE, p);
  objects.set(baseFile("model.json"), base.json);
  objects.set(baseFile("group1-shard1of1.bin"), base.weights);
  const manifest = enc({
    schemaVersion: 1,
    base: { id: "tiny", sha256: baseSha, featureLayer: "feat" },
    input: { size: SIZE, channels: 3 },
    files: [await fileOf("model.json", base.json), await fileOf("group1-shard1of1.bin", base.weights)],
  });
  objects.set(baseFile("base.json"), manifest);
  const manifestSha = await sha256Hex(manifest);

  /**
   * Publishes `name`: a head on the shared base (`split`), or a whole model, with `extra` listed files.
   * `served`: what its pointer lists (default: what the metadata says, as training writes it).
   */
  async function publish(
    name: string,
    options: { whole?: boolean; baseSha?: string; manifestSha?: string; extra?: string[]; served?: (m: ArtifactMetadata) => unknown; tamper?: boolean } = {},
  ): Promise<ArtifactMetadata> {
    const fixture = validMetadata();
    const version = fixture.version;
    const put = (path: string, bytes: Uint8Array) => objects.set(keys.versionFile(name, version, path), bytes);
    const files = [];
    if (options.whole) {
      const whole = await exported(
        tfl.sequential({ layers: [tfl.layers.globalAveragePooling2d({ inputShape: [SIZE, SIZE, 3] }), tfl.layers.dense({ units: 2, activation: "softmax" })] }),
        "group1-shard1of1.bin",
      );
      put("model.json", whole.json);
      put("group1-shard1of1.bin", whole.weights);
      files.push(await fileOf("model.json", whole.json), await fileOf("group1-shard1of1.bin", whole.weights));
    } else {
      const head = await exported(tfl.sequential({ layers: [tfl.layers.dense({ inputShape: [4], units: 2, activation: "softmax" })] }), "head-shard1of1.bin");
      put("head.json", head.json);
      put("head-shard1of1.bin", head.weights);
      files.push(...fixture.files, await fileOf("head.json", head.json), await fileOf("head-shard1of1.bin", head.weights));
    }
    for (const path of options.extra ?? []) {
      const bytes = new Uint8Array(64);
      put(path, bytes);
      files.push(await fileOf(path, bytes));
    }
    const metadata: ArtifactMetadata = {
      ...fixture,
      name,
      input: { size: SIZE, channels: 3 },
      base: { ...fixture.base, sha256: options.baseSha ?? baseSha, featureLayer: "feat" },
      files,
      ...(options.whole ? {} : { split: { baseManifestSha256: options.manifestSha ?? manifestSha, features: 4 } }),
    };
    const text = enc(metadata);
    objects.set(keys.metadata(name, version), text);
    const served = (options.served ?? servedFiles)(metadata);
    const pointer = {
      schemaVersion: 1,
      version,
      // A pointer whose sha256 is not its metadata's: the version is refused before anything it names is used.
      metadataSha256: options.tamper ? "0".repeat(64) : await sha256Hex(text),
      promotedAt: new Date().toISOString(),
      previous: null,
      reason: "test",
      ...(served === undefined ? {} : { served }),
    };
    objects.set(keys.pointer(name), enc(pointer));
    return metadata;
  }
  return { ...fake, baseSha, manifestSha, baseFile, publish };
}

let now = 50_000_000;
const registryOn = (source: ReturnType<typeof fakeSource>["source"]) =>
  new ModelRegistry(source, { ttlMs: 30_000, memoryBudgetBytes: 64 * 1024 * 1024, now: () => now });

/** Serves `name` once: its model, or the error a client would get. */
async function serve(registry: ModelRegistry, name: string) {
  try {
    const { model, release } = await registry.acquire(name, () => {});
    release();
    return model;
  } catch (e) {
    return e as ModelUnavailableError;
  }
}

afterEach(() => {
  vi.restoreAllMocks();
});

describe("heads on a shared base, fetched and held (real tfjs models, fake bucket)", () => {
  it("loads a head that names the right base.json while a head naming a wrong one is still loading it", async () => {
    const b = await bucket();
    await b.publish("wrong", { manifestSha: "c".repeat(64) });
    await b.publish("right");
    const registry = registryOn(b.source);
    // The wrong head's fetch of base.json is held: its load is under way when the right head asks.
    const open = b.holdNext(b.baseFile("base.json"));
    const wrong = serve(registry, "wrong");
    while (b.getsOf(b.baseFile("base.json")) === 0) await new Promise((r) => setTimeout(r, 1));
    const right = serve(registry, "right");
    await new Promise((r) => setTimeout(r, 20));
    open();
    const [w, r] = await Promise.all([wrong, right]);
    expect(w).toBeInstanceOf(ModelUnavailableError);
    expect(r).not.toBeInstanceOf(ModelUnavailableError);
    expect(registry.basesStatus().find((s) => s.heads > 0)).toMatchObject({ sha256: b.baseSha, heads: 1 });
    // And it is not backing off: asked again, it is served without asking storage.
    const gets = b.state.gets;
    expect(await serve(registry, "right")).not.toBeInstanceOf(ModelUnavailableError);
    expect(b.state.gets).toBe(gets);
  });

  it("takes a cold base from the verified metadata, never from the pointer alone; a warm one costs no fetch", async () => {
    const b = await bucket();
    await b.publish("tampered", { tamper: true });
    const registry = registryOn(b.source);
    expect(await serve(registry, "tampered")).toBeInstanceOf(ModelUnavailableError);
    // The pointer lists the base, but the metadata it vouches for is not there: the base was not fetched.
    expect(b.getsOf(b.baseFile("base.json"))).toBe(0);
    expect(b.getsOf(b.baseFile("group1-shard1of1.bin"))).toBe(0);
    expect(registry.basesStatus()).toEqual([]);
    await b.publish("first");
    expect(await serve(registry, "first")).not.toBeInstanceOf(ModelUnavailableError);
    expect(b.getsOf(b.baseFile("base.json"))).toBe(1);
    // A new head on the warm base: the pointer, the metadata and the head's two files; nothing of the base.
    await b.publish("second");
    const before = b.state.keys.length;
    expect(await serve(registry, "second")).not.toBeInstanceOf(ModelUnavailableError);
    expect(b.state.keys.slice(before).sort()).toEqual(
      [
        keys.pointer("second"),
        keys.metadata("second", validMetadata().version),
        ...["head.json", "head-shard1of1.bin"].map((p) => keys.versionFile("second", validMetadata().version, p)),
      ].sort(),
    );
  });

  it("reads a pointer whose `served` it cannot parse, and one that disagrees with its metadata, from the metadata", async () => {
    const b = await bucket();
    // A later form this worker does not know.
    await b.publish("later", { served: (m) => ({ ...servedFiles(m), form: "layered" }) });
    // Another file than the metadata's (a writer's fault): fetched beside the metadata, then dropped.
    await b.publish("odd", {
      served: (m) => ({ ...servedFiles(m), files: [...servedFiles(m).files, { path: "stale.bin", sha256: "e".repeat(64), bytes: 3 }] }),
    });
    const registry = registryOn(b.source);
    for (const name of ["later", "odd"]) {
      const model = await serve(registry, name);
      expect(model, name).not.toBeInstanceOf(ModelUnavailableError);
    }
    const status = new Map(registry.status().map((m) => [m.name, m]));
    expect(status.get("later")?.lastError).toBeUndefined();
    // Served, but the operator sees the pointer's fault.
    expect(status.get("odd")?.version).toBe(validMetadata().version);
    expect(status.get("odd")?.lastError).toMatch(/pointer \(current\.json\) does not list the files .* metadata does/);
  });

  it("fetches a whole model's file and the weights it names, not every file its metadata lists", async () => {
    const b = await bucket();
    await b.publish("whole", { whole: true, extra: ["model.onnx"], served: () => undefined });
    const registry = registryOn(b.source);
    expect(await serve(registry, "whole")).not.toBeInstanceOf(ModelUnavailableError);
    expect(b.getsOf(keys.versionFile("whole", validMetadata().version, "model.onnx"))).toBe(0);
    expect(b.getsOf(keys.versionFile("whole", validMetadata().version, "group1-shard1of1.bin"))).toBe(1);
  });

  it("drops a failed base from /healthz once no head refers to it and its retry time has passed", async () => {
    vi.spyOn(Math, "random").mockReturnValue(0.999);
    const b = await bucket();
    await b.publish("h", { baseSha: "f".repeat(64) }); // a base that was never published
    const registry = registryOn(b.source);
    expect(await serve(registry, "h")).toBeInstanceOf(ModelUnavailableError);
    expect(registry.basesStatus()).toMatchObject([{ sha256: "f".repeat(64), failures: 1 }]);
    // Past its retry time, still shown: the head's error is about it.
    now += 60_000;
    expect(registry.basesStatus()).toHaveLength(1);
    // The head is republished on the real base and loads: nothing refers to the failed one any more.
    await b.publish("h");
    expect(await serve(registry, "h")).not.toBeInstanceOf(ModelUnavailableError);
    expect(registry.basesStatus()).toMatchObject([{ sha256: b.baseSha, heads: 1 }]);
  });
});
