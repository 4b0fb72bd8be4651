import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type LocalS3, startLocalS3 } from "../../infra/local/s3-server.ts";
import { ObjectTooLargeError } from "./store.ts";

/** The job's S3 access against the local S3 API server. */
let s3: LocalS3;
beforeAll(async () => {
  s3 = await startLocalS3();
});
afterAll(async () => {
  await s3?.stop();
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
