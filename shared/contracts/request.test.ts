import { describe, expect, it } from "vitest";
import { hmacSha256Hex } from "../hash.ts";
import { isCaptureKey, keys } from "../keys.ts";
import { operatorRequestSchema, requestMessage, requestOfKey } from "./request.ts";

const base = { id: "20261206T051500-abcd1234", model: "pets", issuedAt: "2026-12-06T05:15:00.000Z", by: "console", signature: "0".repeat(64) };

/** What the worker reads from the pointer for a rollback or promotion. */
const served = { from: "v00000000000a", fromPromotedAt: "2026-12-06T05:00:00.000Z" };

describe("operator requests", () => {
  it("name a version exactly for promote and export-onnx", () => {
    expect(operatorRequestSchema.safeParse({ ...base, ...served, kind: "promote", version: "v0123456789ab" }).success).toBe(true);
    expect(operatorRequestSchema.safeParse({ ...base, ...served, kind: "promote" }).success).toBe(false);
    expect(operatorRequestSchema.safeParse({ ...base, ...served, kind: "rollback", to: "v0123456789ab", version: "v0123456789ab" }).success).toBe(false);
    expect(operatorRequestSchema.safeParse({ ...base, kind: "train" }).success).toBe(true);
    expect(operatorRequestSchema.safeParse({ ...base, kind: "drop-tables" }).success).toBe(false);
  });

  it("name the served version when asked for a rollback or promotion (and a rollback its target), for no other kind", () => {
    expect(operatorRequestSchema.safeParse({ ...base, ...served, kind: "rollback", to: "v0123456789ab" }).success).toBe(true);
    expect(operatorRequestSchema.safeParse({ ...base, ...served, kind: "rollback" }).success).toBe(false);
    expect(operatorRequestSchema.safeParse({ ...base, kind: "rollback", to: "v0123456789ab" }).success).toBe(false);
    expect(operatorRequestSchema.safeParse({ ...base, from: served.from, kind: "promote", version: "v0123456789ab" }).success).toBe(false);
    expect(operatorRequestSchema.safeParse({ ...base, ...served, kind: "train" }).success).toBe(false);
  });

  it("sign every field that changes what the dispatcher does", async () => {
    const r = { ...base, ...served, kind: "rollback" as const, to: "v0123456789ab" };
    const signature = await hmacSha256Hex("k", requestMessage(r));
    for (const changed of [
      { kind: "export-onnx" as const },
      { version: "v0123456789ac" },
      { from: "v00000000000b" },
      { fromPromotedAt: "2026-12-06T05:00:01.000Z" },
      { to: "v0123456789ac" },
      { model: "cats" },
      { id: "20261206T051500-abcd1235" },
      { issuedAt: "2026-12-06T05:16:00.000Z" },
    ])
      expect(await hmacSha256Hex("k", requestMessage({ ...r, ...changed })), JSON.stringify(changed)).not.toBe(signature);
  });

  it("live under captures/ where the worker may write them; the dispatcher's claims do not", () => {
    expect(isCaptureKey(keys.captureRequest("pets", base.id))).toBe(true);
    expect(isCaptureKey(keys.captureOutcome("pets", base.id))).toBe(true);
    expect(isCaptureKey(keys.captureRequests("pets"), true)).toBe(true);
    expect(isCaptureKey(keys.requestApplied("pets", base.id))).toBe(false);
    expect(isCaptureKey(keys.versionOnnx("pets", "v0123456789ab"))).toBe(false);
    expect(isCaptureKey("captures/pets/requests/../../models/pets/current.json")).toBe(false);
  });

  it("are recognised by their key only when model and id are valid (outcomes are not requests)", () => {
    expect(requestOfKey(keys.captureRequest("pets", base.id))).toEqual({ model: "pets", id: base.id });
    expect(requestOfKey(keys.captureOutcome("pets", base.id))).toBeNull();
    expect(requestOfKey(`captures/pets/requests/junk.json`)).toBeNull();
    expect(requestOfKey(`captures/Pets!/requests/${base.id}.json`)).toBeNull();
    expect(requestOfKey(keys.manifest("pets"))).toBeNull();
  });
});
