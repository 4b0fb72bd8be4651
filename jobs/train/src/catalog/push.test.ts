import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { manifestSchema } from "#shared/contracts/dataset.ts";
import { keys } from "#shared/keys.ts";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import { aroundWrites } from "../../../../test/support/store.ts";
import { sampleDataset } from "../dataset/sample.ts";
import { PushInProgressError, pushDataset } from "./push.ts";

/** `edgetune push` against the local S3 server: one push into a dataset at a time, and the dataset becomes what the folder holds. */
let s3: LocalS3;
let work: string;
beforeAll(async () => {
  s3 = await startLocalS3();
  work = await mkdtemp(join(tmpdir(), "edgetune-push-"));
});
afterAll(async () => {
  await s3?.stop();
  await rm(work, { recursive: true, force: true });
});

/** A folder of sample images, `perLabel` of each label (from `offset`). */
async function folder(name: string, perLabel: number, labels: string[], offset = 0): Promise<string> {
  const dir = join(work, name);
  for (const i of (await sampleDataset({ perLabel, offset, size: 32 })).filter((i) => labels.includes(i.label))) {
    await mkdir(dirname(join(dir, i.file)), { recursive: true });
    await writeFile(join(dir, i.file), i.bytes);
  }
  return dir;
}
async function datasetKeys(name: string): Promise<string[]> {
  const out: string[] = [];
  for await (const o of s3.store.list(keys.dataset(name))) out.push(o.key.slice(keys.dataset(name).length));
  return out;
}
const manifestOf = async (name: string) => manifestSchema.parse(JSON.parse(new TextDecoder().decode((await s3.store.get(keys.manifest(name))) as Uint8Array)));

describe("push", () => {
  it("refuses a second push into a dataset while one is uploading: no silent merge, the manifest counts one folder", async () => {
    const a = await folder("a", 6, ["animals", "food", "travel"]);
    const b = await folder("b", 6, ["animals", "food"], 6);
    // The second push starts while the first uploads its first image, and runs to its end meanwhile.
    let second: Promise<unknown> | undefined;
    const uploading = aroundWrites(s3.store, {
      before: async (k) => {
        if (k.startsWith(keys.dataset("shared-set")) && !second) {
          second = pushDataset(s3.store, b, "shared-set");
          await second.catch(() => {});
        }
      },
    });
    const first = await pushDataset(uploading, a, "shared-set");
    await expect(second).rejects.toThrow(PushInProgressError);
    await expect(second).rejects.toThrow("Another push into dataset shared-set is in progress");
    const files = (await datasetKeys("shared-set")).filter((k) => k !== "manifest.json");
    expect(files.length).toBe(first.uploaded);
    expect((await manifestOf("shared-set")).imageCount).toBe(18);
    // Once the first has finished, the dataset is free again.
    const again = await pushDataset(s3.store, b, "shared-set");
    expect(again.uploaded).toBe(12);
  });

  it("removes from the dataset what the folder no longer has, says so, and keeps accepted captures", async () => {
    const dir = await folder("repush", 6, ["animals", "food", "travel"]);
    await pushDataset(s3.store, dir, "repush");
    await s3.store.put(`${keys.dataset("repush")}travel/captured-20261129T101500-abcd1234.png`, new Uint8Array([1]));
    await s3.store.put(keys.capturedApplied("repush", "repush", "20261129T101500-abcd1234"), "{}");
    await rm(join(dir, "travel"), { recursive: true });
    const before = await datasetKeys("repush");
    const dry = await pushDataset(s3.store, dir, "repush", {}, undefined, { dryRun: true });
    expect(await datasetKeys("repush")).toEqual(before);
    const r = await pushDataset(s3.store, dir, "repush");
    expect(r.removed).toEqual(dry.removed);
    expect(r.removed).toHaveLength(6);
    expect(r.removed.every((k) => k.startsWith("travel/") && !k.includes("captured-"))).toBe(true);
    const after = await datasetKeys("repush");
    expect(after.filter((k) => k.startsWith("travel/"))).toEqual(["travel/captured-20261129T101500-abcd1234.png"]);
    expect(after).toContain(".edgetune/captured-applied/repush/20261129T101500-abcd1234.json");
    expect((await manifestOf("repush")).imageCount).toBe(12);
    // Asked for: the captures go too.
    const all = await pushDataset(s3.store, dir, "repush", {}, undefined, { dropCaptured: true });
    expect(all.removed).toEqual(["travel/captured-20261129T101500-abcd1234.png"]);
  });
});
