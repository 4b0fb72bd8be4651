import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import type { ModelPointer } from "#shared/contracts/artifact.ts";
import { validMetadata } from "#shared/contracts/fixtures.ts";
import { keys } from "#shared/keys.ts";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import type { RunPlan } from "../plan.ts";
import { checkOwnership, OwnershipError } from "./ownership.ts";

/** Who owns a model when its served version's metadata cannot be read, or when no pointer names an owner (local S3 server). */
let s3: LocalS3;
beforeAll(async () => {
  s3 = await startLocalS3({ bucket: "ownership" });
});
afterAll(async () => {
  await s3?.stop();
});
beforeEach(async () => {
  const all: string[] = [];
  for await (const o of s3.store.list("")) all.push(o.key);
  if (all.length) await s3.store.delete(all);
});

/** The parts of a plan the check reads: the model, the dataset and its labels, the two explicit acts. */
const plan = (dataset: string, options: { takeOver?: boolean } = {}) =>
  ({ name: "pets", dataset: { name: dataset, labels: ["cat", "dog"] }, options }) as unknown as RunPlan;
const version = (v: string, dataset: string, createdAt: string) =>
  s3.store.put(keys.metadata("pets", v), JSON.stringify({ ...validMetadata(), version: v, createdAt, dataset: { ...validMetadata().dataset, name: dataset } }));

describe("a model's owner", () => {
  it("is the pointer's dataset even when the served version's metadata cannot be read", async () => {
    const pointer: ModelPointer = {
      schemaVersion: 1,
      version: "v0123456789ab",
      metadataSha256: "b".repeat(64),
      promotedAt: new Date().toISOString(),
      previous: null,
      reason: "test",
      dataset: "owner-a",
    };
    await expect(checkOwnership(s3.store, plan("owner-b"), pointer)).rejects.toThrow(OwnershipError);
    await expect(checkOwnership(s3.store, plan("owner-b"), pointer)).rejects.toThrow(/belongs to dataset owner-a/);
    await checkOwnership(s3.store, plan("owner-a"), pointer);
    await checkOwnership(s3.store, plan("owner-b", { takeOver: true }), pointer);
  });

  it("is the newest version's dataset when the model has versions and no pointer", async () => {
    await version("v0000000000a1", "owner-b", "2026-11-01T00:00:00.000Z");
    await version("v0000000000a2", "owner-a", "2026-11-20T00:00:00.000Z");
    await expect(checkOwnership(s3.store, plan("owner-b"), null)).rejects.toThrow(/belongs to dataset owner-a \(its newest version v0000000000a2, none served/);
    await checkOwnership(s3.store, plan("owner-a"), null);
    await checkOwnership(s3.store, plan("owner-b", { takeOver: true }), null);
  });

  it("is nobody for a model without versions", async () => {
    await checkOwnership(s3.store, plan("anyone"), null);
  });
});
