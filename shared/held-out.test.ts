import { describe, expect, it } from "vitest";
import { compareHeldOut, heldOutSha256 } from "./held-out.ts";

const images = [
  { id: "etag-a-100", label: "cat" },
  { id: "etag-b-120", label: "dog" },
  { id: "etag-c-90", label: "cat" },
];

describe("held-out identity", () => {
  it("is the same set whatever the order, and changes with any image or label", async () => {
    const base = await heldOutSha256(images);
    expect(await heldOutSha256([...images].reverse())).toBe(base);
    expect(await heldOutSha256(images.slice(1))).not.toBe(base);
    expect(await heldOutSha256([...images, { id: "etag-d-80", label: "dog" }])).not.toBe(base);
    expect(await heldOutSha256(images.map((i, n) => (n === 0 ? { ...i, label: "dog" } : i)))).not.toBe(base);
    // No separator games: an id that ends like a label is another image.
    expect(await heldOutSha256([{ id: "x", label: "yz" }])).not.toBe(await heldOutSha256([{ id: "xy", label: "z" }]));
  });

  it("tells same, different and not recorded apart, in words", () => {
    const a = { version: "v000000000001", evaluatedOn: 18, heldOutSha256: "a".repeat(64), datasetFingerprint: "f".repeat(64) };
    expect(compareHeldOut(a, { ...a, version: "v000000000002" })).toEqual({
      same: true,
      message: "Both were measured on the same 18 held-out images: a like-for-like comparison.",
    });
    const other = compareHeldOut(a, { ...a, version: "v000000000002", heldOutSha256: "b".repeat(64), evaluatedOn: 24 });
    expect(other.same).toBe(false);
    expect(other.message).toContain("v000000000001 and v000000000002 were measured on different held-out images (18 and 24 held-out images)");
    // Not recorded on one side: a different count still proves the sets differ; an equal one proves nothing.
    const older = { ...a, version: "v000000000003", heldOutSha256: undefined };
    expect(compareHeldOut(a, { ...older, evaluatedOn: 20 }).same).toBe(false);
    const unknown = compareHeldOut(older, a);
    expect(unknown.same).toBeNull();
    expect(unknown.message).toBe(
      "Whether both were measured on the same held-out images is not known: v000000000003 predates that record (18 held-out images each, trained on the same dataset); read the numbers as possibly not like for like.",
    );
  });
});
