import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readMetadata, readPointer } from "#shared/artifacts.ts";
import { servedFiles } from "#shared/contracts/artifact.ts";
import { keys } from "#shared/keys.ts";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import { uploadSample } from "../../../../test/support/datasets.ts";
import { aroundWrites } from "../../../../test/support/store.ts";
import { rollback } from "../catalog/catalog.ts";
import { memoryLogger } from "../log.ts";
import { train } from "../train.ts";

/**
 * Who may move a model's pointer, against the local S3 server with real (tiny) training runs: a model
 * belongs to the dataset that created it, and the pointer moves only by compare-and-swap, so a rollback
 * made while a run trains stands.
 */
let s3: LocalS3;
const quick = { imageSize: 96, views: 1, head: { epochs: 3 }, promote: "always" } as const;

beforeAll(async () => {
  s3 = await startLocalS3();
  await uploadSample(s3.store, "owner-a", { perLabel: 6, manifest: { model: "shared" } });
  await uploadSample(s3.store, "owner-b", { perLabel: 6, offset: 6, manifest: { model: "shared" } });
}, 60_000);
afterAll(async () => {
  await s3?.stop();
});

describe("a model belongs to the dataset that created it", () => {
  it("refuses another dataset's manifest naming it, until an operator takes it over; a new label set needs --relabel", async () => {
    const first = await train(s3.store, { dataset: "owner-a", ...quick }, memoryLogger());
    expect(first).toMatchObject({ name: "shared", promoted: true });
    expect((await readPointer(s3.store, "shared"))?.dataset).toBe("owner-a");

    // Another dataset's manifest names the model: refused before any training, saying who owns it and how to change that.
    await expect(train(s3.store, { dataset: "owner-b", ...quick }, memoryLogger())).rejects.toThrow(
      "Model shared belongs to dataset owner-a (it serves " +
        `${first.version}, trained on owner-a); dataset owner-b does not train into it. Give owner-b its own model (the manifest's "model"), or make owner-b the model's dataset on purpose: edgetune train --dataset owner-b --model shared --take-over.`,
    );
    expect((await readPointer(s3.store, "shared"))?.version).toBe(first.version);

    // The explicit act: the model now belongs to owner-b, and owner-a may no longer train into it.
    const taken = await train(s3.store, { dataset: "owner-b", ...quick, takeOver: true }, memoryLogger());
    expect(taken.promoted).toBe(true);
    expect(await readPointer(s3.store, "shared")).toMatchObject({ version: taken.version, dataset: "owner-b" });
    await expect(train(s3.store, { dataset: "owner-a", ...quick, seed: 7 }, memoryLogger())).rejects.toThrow(/belongs to dataset owner-b/);

    // Its own dataset loses a label: the model's clients would get other labels, so only with --relabel.
    const travel: string[] = [];
    for await (const o of s3.store.list("datasets/owner-b/travel/")) travel.push(o.key);
    await s3.store.delete(travel);
    await expect(train(s3.store, { dataset: "owner-b", ...quick }, memoryLogger())).rejects.toThrow(
      "Model shared serves the labels animals, food, travel; dataset owner-b now has animals, food (gone: travel). Its clients would get other labels: to change the model's label set on purpose, edgetune train --dataset owner-b --model shared --relabel.",
    );
    const relabelled = await train(s3.store, { dataset: "owner-b", ...quick, relabel: true }, memoryLogger());
    expect(relabelled.promoted).toBe(true);
  }, 240_000);
});

describe("the pointer moves by compare-and-swap", () => {
  it("a rollback made while a run trains stands: the run ends not promoted and says why", async () => {
    const before = (await readPointer(s3.store, "shared")) as NonNullable<Awaited<ReturnType<typeof readPointer>>>;
    const back = before.history?.[0] as string;
    // The operator rolls back the moment the run writes its version's files (after it compared itself).
    let rolledBack = false;
    let duringRun: boolean | undefined;
    const store = aroundWrites(s3.store, {
      before: async (k) => {
        if (!rolledBack && k.startsWith("models/shared/v") && k.endsWith("/model.json")) {
          rolledBack = true;
          duringRun = (await rollback(s3.store, "shared")).duringRun;
        }
      },
    });
    const run = await train(store, { dataset: "owner-b", ...quick, seed: 9 }, memoryLogger());
    // The run holds the model's lock; the rollback does not wait for it (it could wait hours).
    expect([rolledBack, duringRun]).toEqual([true, true]);
    expect(run.promoted).toBe(false);
    expect(run.reason).toBe(
      `not promoted: the served version changed while it trained (rolled back to ${back}); serve this one with edgetune rollback shared --to ${run.version}`,
    );
    const now = await readPointer(s3.store, "shared");
    expect(now?.version).toBe(back);
    // The rolled-back pointer lists the files of the version it names, not of the one it left.
    expect(now?.served).toEqual(servedFiles(await readMetadata(s3.store, "shared", back)));
  }, 120_000);

  it("a rollback --to the version already served changes nothing", async () => {
    const served = await s3.store.get(keys.pointer("shared"));
    const version = (await readPointer(s3.store, "shared"))?.version as string;
    const r = await rollback(s3.store, "shared", version);
    expect([r.changed, r.duringRun]).toEqual([false, false]);
    expect(await s3.store.head(keys.lock("shared"))).toBeNull(); // taken while it worked, and released
    expect(await s3.store.get(keys.pointer("shared"))).toEqual(served);
  });
});
