import * as ort from "onnxruntime-node";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { historyOf, readPointer } from "#shared/artifacts.ts";
import { type CaptureRecord, captureDecisionSchema, decisionMessage } from "#shared/contracts/capture.ts";
import {
  MAX_REQUEST_AGE_MS,
  type OperatorRequest,
  onnxExportSchema,
  type RequestKind,
  requestMessage,
  requestOutcomeSchema,
} from "#shared/contracts/request.ts";
import { hmacSha256Hex, sha256Hex } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import { Dispatcher } from "../../../../infra/local/dispatcher.ts";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import { barePng } from "../../../../test/support/crafted-images.ts";
import { uploadSample } from "../../../../test/support/datasets.ts";
import { rollback } from "../catalog/catalog.ts";
import { memoryLogger } from "../log.ts";
import { dispatchNightly } from "../nightly.ts";
import { train } from "../train.ts";
import { isCapturesKey, runRequests } from "./command.ts";
import { applyRequests, modelsWithRequests } from "./requests.ts";

/**
 * Console requests applied by the dispatcher, against the local S3 server and a really trained model
 * (two versions): each kind through the CLI's own functions, and every refusal (signature, age, replay,
 * unknown version, a model whose dataset now trains another model). The last test runs the local
 * dispatcher, which picks requests up by polling and runs them as the Batch container would.
 */
const OPERATOR = "operator-key-requests-0123";
let s3: LocalS3;
let v1: string;
let v2: string;
let n = 0;

beforeAll(async () => {
  s3 = await startLocalS3();
  await uploadSample(s3.store, "emoji", { perLabel: 8, size: 96 });
  const small = { dataset: "emoji", imageSize: 96 as const, views: 1, head: { epochs: 5 }, promote: "always" as const };
  v1 = (await train(s3.store, small, memoryLogger())).version;
  v2 = (await train(s3.store, { ...small, seed: 7 }, memoryLogger())).version;
}, 240_000);
afterAll(async () => {
  await s3?.stop();
});

/** A request as the worker writes it: signed with `key`, issued `ageMs` ago; a rollback or promotion names the served version (and a rollback its target) as the worker reads them. */
async function request(kind: RequestKind, options: { version?: string; key?: string; ageMs?: number; model?: string } = {}): Promise<OperatorRequest> {
  const issuedAt = new Date(Date.now() - (options.ageMs ?? 0)).toISOString();
  const id = `${issuedAt.slice(0, 19).replace(/[-:]/g, "")}-${(0xabc00000 + n++).toString(16)}`;
  const pointer = kind === "rollback" || kind === "promote" ? await readPointer(s3.store, "emoji") : null;
  const unsigned = {
    id,
    model: options.model ?? "emoji",
    kind,
    ...(options.version ? { version: options.version } : {}),
    ...(pointer ? { from: pointer.version, fromPromotedAt: pointer.promotedAt } : {}),
    ...(pointer && kind === "rollback" ? { to: historyOf(pointer)[0] } : {}),
    issuedAt,
  };
  const r: OperatorRequest = {
    schemaVersion: 1,
    ...unsigned,
    by: "console",
    signature: await hmacSha256Hex(options.key ?? OPERATOR, requestMessage(unsigned)),
  };
  await s3.store.put(keys.captureRequest(r.model, r.id), JSON.stringify(r), "application/json");
  return r;
}

const trainCalls: string[] = [];
const deps = () => ({
  log: memoryLogger(),
  operatorKeys: [OPERATOR],
  train: async (dataset: string) => {
    trainCalls.push(dataset);
    return `queued ${dataset}`;
  },
});
const apply = async () => applyRequests(s3.store, "emoji", deps());
const served = async () => (await readPointer(s3.store, "emoji"))?.version;
const stored = async (r: OperatorRequest) => {
  const bytes = await s3.store.get(keys.captureOutcome("emoji", r.id));
  return bytes ? requestOutcomeSchema.parse(JSON.parse(new TextDecoder().decode(bytes))) : null;
};

describe("console requests, applied by the dispatcher", () => {
  it("promotes a version and rolls back, as edgetune rollback does; the outcome is stored and the request removed", async () => {
    expect(await served()).toBe(v2);
    const promote = await request("promote", { version: v1 });
    const [out] = await apply();
    expect(out).toMatchObject({ id: promote.id, state: "done", kind: "promote", version: v1 });
    expect(out?.message).toContain(`now serves ${v1} (was ${v2})`);
    expect(await served()).toBe(v1);
    expect(await stored(promote)).toEqual(out);
    expect(await s3.store.head(keys.captureRequest("emoji", promote.id))).toBeNull();
    // Rollback: the version served before, as the CLI's default.
    await request("rollback");
    const [back] = await apply();
    expect(back?.state).toBe("done");
    expect(await served()).toBe(v2);
    // Promoting the served version changes nothing and says so.
    await request("promote", { version: v2 });
    expect((await apply())[0]?.message).toContain("already serves");
  });

  it("refuses a request not signed by an operator key, a stale one, one from the future, and an unknown version", async () => {
    const forged = await request("promote", { version: v1, key: "the-edge-s3-key-is-not-an-operator" });
    const stale = await request("promote", { version: v1, ageMs: MAX_REQUEST_AGE_MS + 60_000 });
    const future = await request("promote", { version: v1, ageMs: -10 * 60_000 });
    const unknown = await request("promote", { version: "v0000000000ff" });
    const log = memoryLogger();
    const outcomes = await applyRequests(s3.store, "emoji", { ...deps(), log });
    const byId = new Map(outcomes.map((o) => [o.id, o]));
    expect(byId.get(forged.id)).toMatchObject({
      state: "refused",
      message: expect.stringContaining("not signed by a current operator key (CONSOLE_API_KEYS): possibly forged"),
    });
    // A forgery is a warning in the dispatcher's log (someone holds the edge's key), not an info line among outcomes.
    expect(log.lines).toContainEqual(
      expect.objectContaining({
        level: "warn",
        message: expect.stringContaining(`${forged.id} of emoji is not signed by a current operator key: possibly forged`),
      }),
    );
    expect(byId.get(stale.id)).toMatchObject({ state: "refused", message: expect.stringContaining("minutes a request stays valid") });
    expect(byId.get(future.id)).toMatchObject({ state: "refused", message: expect.stringContaining("in the future") });
    expect(byId.get(unknown.id)).toMatchObject({ state: "refused", message: expect.stringContaining("v0000000000ff") });
    expect(await served()).toBe(v2);
    // A signature over other fields: a signed promote of v1 edited to name v2 (the edge's key can write it).
    const edited = await request("promote", { version: v1 });
    await s3.store.put(keys.captureRequest("emoji", edited.id), JSON.stringify({ ...edited, kind: "rollback", version: undefined }));
    expect((await apply())[0]).toMatchObject({ id: edited.id, state: "refused" });
    expect(await served()).toBe(v2);
  });

  it("applies a request once: the same signed request written again is refused", async () => {
    const promote = await request("promote", { version: v1 });
    expect((await apply())[0]?.state).toBe("done");
    await rollback(s3.store, "emoji", v2);
    // Replayed with the edge's key (it may read and write captures/): the claim outside captures/ stops it.
    await s3.store.put(keys.captureRequest("emoji", promote.id), JSON.stringify(promote));
    const [replay] = await apply();
    expect(replay).toMatchObject({ state: "refused", message: expect.stringContaining("applied before") });
    expect(await served()).toBe(v2);
    expect(await s3.store.head(keys.requestApplied("emoji", promote.id))).not.toBeNull();
  });

  it("leaves a request another dispatcher job claimed moments ago to it; one claimed long ago without an outcome is answered provisionally", async () => {
    const r = await request("promote", { version: v1 });
    const claimedAt = Date.now() - 60_000;
    await s3.store.put(keys.requestApplied("emoji", r.id), JSON.stringify({ ...r, appliedAt: new Date(claimedAt).toISOString() }));
    // Job A claimed it and is applying it: job B writes no outcome ("applied before" would be false) and leaves the file.
    expect(await apply()).toEqual([]);
    expect(await stored(r)).toBeNull();
    expect(await s3.store.head(keys.captureRequest("emoji", r.id))).not.toBeNull();
    // Twenty minutes on, still no outcome: A stopped (or is still running). Said so, marked as replaceable.
    const later = await applyRequests(s3.store, "emoji", { ...deps(), now: () => new Date(claimedAt + 20 * 60_000) });
    expect(later).toEqual([
      expect.objectContaining({ id: r.id, state: "refused", provisional: true, message: expect.stringContaining("may or may not have been applied") }),
    ]);
    expect(await stored(r)).toMatchObject({ provisional: true });
    expect(await s3.store.head(keys.captureRequest("emoji", r.id))).toBeNull();
    expect(await served()).toBe(v2);
  });

  it("the nightly sweep finds a model's waiting request behind junk that sorts first", async () => {
    expect(await modelsWithRequests(s3.store)).toEqual([]);
    await s3.store.put(`${keys.captureRequests("emoji")}!.json`, "{}");
    const waiting = await request("train");
    expect(await modelsWithRequests(s3.store)).toEqual(["emoji"]);
    const outcomes = await apply();
    expect(outcomes.map((o) => o.id)).toEqual([waiting.id]);
    expect(await modelsWithRequests(s3.store)).toEqual([]);
  });

  it("deletes files under requests/ not named as requests without an outcome; one named as a request but not one is answered", async () => {
    await s3.store.put(`${keys.captureRequests("emoji")}junk.json`, "{}");
    const misfiled = await request("rollback", { model: "other" });
    await s3.store.put(keys.captureRequest("emoji", misfiled.id), JSON.stringify(misfiled));
    const outcomes = await apply();
    expect(outcomes).toEqual([expect.objectContaining({ id: misfiled.id, state: "refused", message: expect.stringContaining("was replaced") })]);
    expect(await served()).toBe(v2);
    const left: string[] = [];
    for await (const o of s3.store.list(keys.captureRequests("emoji"))) left.push(o.key);
    expect(left).toEqual([]);
  });

  it("refuses a withheld request written back after the served version moved, and answers a request file replaced by junk", async () => {
    expect(await served()).toBe(v2);
    // The edge's key reads a rollback and replaces it with junk: it is answered (not lost), and nothing moves.
    const withheld = await request("rollback");
    await s3.store.put(keys.captureRequest("emoji", withheld.id), "not a request");
    expect((await apply())[0]).toMatchObject({ id: withheld.id, state: "refused", message: expect.stringContaining("was replaced") });
    expect(await served()).toBe(v2);
    // The operator asks again: one step back. The withheld copy, written back fresh and unclaimed, finds the pointer moved.
    await request("rollback");
    expect((await apply())[0]?.state).toBe("done");
    expect(await served()).toBe(v1);
    await s3.store.put(keys.captureRequest("emoji", withheld.id), JSON.stringify(withheld));
    expect((await apply())[0]).toMatchObject({
      id: withheld.id,
      state: "refused",
      message: expect.stringContaining(`served ${v2} when this was asked and serves ${v1} now`),
    });
    expect(await served()).toBe(v1);
    // The same for a withheld "serve v2" once other decisions moved the pointer away and back (v1 → v2 → v1).
    const promote = await request("promote", { version: v2 });
    await s3.store.delete([keys.captureRequest("emoji", promote.id)]);
    await rollback(s3.store, "emoji", v2);
    await rollback(s3.store, "emoji", v1);
    await s3.store.put(keys.captureRequest("emoji", promote.id), JSON.stringify(promote));
    expect((await apply())[0]).toMatchObject({ id: promote.id, state: "refused", message: expect.stringContaining("served anew since") });
    expect(await served()).toBe(v1);
    // Junk written where a request was applied does not replace its outcome.
    const done = await request("promote", { version: v2 });
    expect((await apply())[0]?.state).toBe("done");
    await s3.store.put(keys.captureRequest("emoji", done.id), "junk");
    await apply();
    expect(await stored(done)).toMatchObject({ state: "done" });
    expect(await served()).toBe(v2);
  });

  it("a key under captures/ that is no request's name starts no training job, and an upload's bad name is never submitted", async () => {
    const submitted: string[] = [];
    const submit = async (dataset: string) => {
      submitted.push(dataset);
      return "job-1";
    };
    // What the trigger matches (EventBridge's * spans slashes) but no request is named: an extra level, a bad id, an uppercase model.
    const misnamed = ["captures/emoji/requests/x.json", "captures/emoji/requests/a/b.json", `captures/Emoji/requests/20261206T051500-abcd1234.json`];
    for (const key of misnamed) {
      await s3.store.put(key, "{}");
      expect(isCapturesKey(key)).toBe(true); // the dispatcher's entry (commands/train.ts) sends it to runRequests, not to an upload's planning
      const log = memoryLogger();
      await runRequests(s3.store, { dataset: key }, log, { json: true, submit });
      expect(log.lines).toContainEqual(expect.objectContaining({ level: "warn", message: expect.stringContaining("not named as a console request") }));
      await s3.store.delete([key]);
    }
    // The upload path itself refuses such a name before submitting, and records no status under it.
    const r = await dispatchNightly(s3.store, {}, submit, memoryLogger(), ["captures/emoji/requests/x.json"]);
    expect(r.failed).toEqual([{ dataset: "captures/emoji/requests/x.json", reason: expect.stringContaining("not a dataset name") }]);
    expect(submitted).toEqual([]);
    const status: string[] = [];
    for await (const o of s3.store.list("status/captures")) status.push(o.key);
    expect(status).toEqual([]);
  });

  it("train now starts a run of the model's own dataset; a dataset that now trains another model is refused", async () => {
    trainCalls.length = 0;
    await request("train");
    expect((await apply())[0]).toMatchObject({ state: "done", message: "queued emoji" });
    expect(trainCalls).toEqual(["emoji"]);
    const manifest = (await s3.store.get(keys.manifest("emoji"))) as Uint8Array;
    await s3.store.put(keys.manifest("emoji"), JSON.stringify({ model: "emoji2" }));
    try {
      await request("train");
      const [out] = await apply();
      expect(out).toMatchObject({ state: "refused", message: expect.stringContaining("now train model emoji2") });
      expect(trainCalls).toEqual(["emoji"]);
    } finally {
      await s3.store.put(keys.manifest("emoji"), manifest);
    }
  });

  it("apply reviewed: signed console decisions join the dataset now", async () => {
    const day = new Date().toISOString().slice(0, 10);
    const id = `${day.replaceAll("-", "")}T101500-abcd00000001`;
    const image = barePng(
      new Uint8Array(
        await sharp({ create: { width: 24, height: 24, channels: 3, background: "#4a8" } })
          .png()
          .toBuffer(),
      ),
    );
    const record: CaptureRecord = {
      schemaVersion: 1,
      id,
      model: "emoji",
      version: v2,
      capturedAt: `${day}T10:15:00.000Z`,
      reason: "low_confidence",
      predictions: [{ label: "food", score: 0.4 }],
      image: { key: keys.captureFile("emoji", day, id, "png"), contentType: "image/png", bytes: image.length, width: 24, height: 24, resized: false },
    };
    await s3.store.put(record.image.key, image);
    await s3.store.put(keys.captureRecord("emoji", id), JSON.stringify(record));
    const unsigned = { id, action: "accept" as const, label: "food", decidedAt: new Date().toISOString(), imageSha256: await sha256Hex(image) };
    const decision = captureDecisionSchema.parse({ ...unsigned, by: "console", signature: await hmacSha256Hex(OPERATOR, decisionMessage("emoji", unsigned)) });
    await s3.store.put(keys.captureDecision("emoji", id), JSON.stringify(decision));
    await request("apply-reviewed");
    const [out] = await apply();
    expect(out).toMatchObject({ state: "done", message: expect.stringContaining("1 added to the dataset") });
    expect(await s3.store.get(`datasets/emoji/food/captured-${id}.png`)).toEqual(image);
  });

  it("exports a version as ONNX beside it: the file runs in onnxruntime-node and its description matches it", async () => {
    // tfjs is started only for an export that passed its checks: not for a forged one, nor an unknown version.
    let tfStarts = 0;
    const counting = { ...deps(), loadTf: async () => tfStarts++ };
    await request("export-onnx", { version: v1, key: "the-edge-s3-key-is-not-an-operator" });
    await request("export-onnx", { version: "v0000000000ff" });
    expect((await applyRequests(s3.store, "emoji", counting)).map((o) => o.state)).toEqual(["refused", "refused"]);
    expect(tfStarts).toBe(0);
    const r = await request("export-onnx", { version: v1 });
    const [out] = await applyRequests(s3.store, "emoji", counting);
    expect(tfStarts).toBe(1);
    expect(out).toMatchObject({ id: r.id, state: "done", message: expect.stringContaining("exported as ONNX") });
    const bytes = (await s3.store.get(keys.versionOnnx("emoji", v1))) as Uint8Array;
    const info = onnxExportSchema.parse(JSON.parse(new TextDecoder().decode((await s3.store.get(keys.versionOnnxInfo("emoji", v1))) as Uint8Array)));
    expect(info).toMatchObject({ model: "emoji", version: v1, bytes: bytes.byteLength, sha256: await sha256Hex(bytes) });
    const session = await ort.InferenceSession.create(bytes);
    const output = await session.run({ image: new ort.Tensor("uint8", new Uint8Array(96 * 96 * 3).fill(128), [1, 96, 96, 3]) });
    const p = Array.from(output.probabilities?.data as Float32Array);
    expect(p).toHaveLength(3);
    expect(p.reduce((a, b) => a + b, 0)).toBeCloseTo(1, 4);
    await request("export-onnx", { version: "v0000000000ff" });
    expect((await apply())[0]).toMatchObject({ state: "refused" });
  }, 60_000);

  it("the local dispatcher picks a request up by polling, runs it as the Batch container would, and queues its training", async () => {
    const dispatcher = new Dispatcher({
      store: s3.store,
      s3: s3.config,
      pollMs: 200,
      trainArgs: ["--image-size", "96", "--views", "1", "--epochs", "5", "--promote", "always"],
      output: "collect",
    });
    process.env.EDGETUNE_CONSOLE_KEYS = OPERATOR; // the child's environment, as the stack gives the dispatcher
    try {
      dispatcher.start();
      await dispatcher.idle(); // the manifest already there is trained first, as on a fresh start
      const promote = await request("promote", { version: v1 });
      const now = await request("train");
      for (let i = 0; i < 300 && !(await stored(now)); i++) await new Promise((r) => setTimeout(r, 100));
      await dispatcher.idle();
      expect(await stored(promote)).toMatchObject({ state: "done" });
      expect(await stored(now)).toMatchObject({ state: "done", message: expect.stringContaining("training run of dataset emoji is queued") });
      const trainNow = dispatcher.jobs.find((j) => j.reason === "train-now");
      expect(trainNow).toMatchObject({ dataset: "emoji", status: "succeeded" });
    } finally {
      delete process.env.EDGETUNE_CONSOLE_KEYS;
      await dispatcher.stop();
    }
  }, 240_000);
});
