import { describe, expect, it } from "vitest";
import { hashDistance } from "#shared/image/input-hash.ts";
import { NEAR_DUPLICATE_BITS, nearDuplicatesByHash, separateNearDuplicates } from "./near-duplicates.ts";

function rng(seed: number) {
  let s = seed;
  return () => {
    s = (s * 1103515245 + 12345) % 2147483648;
    return s / 2147483648;
  };
}
const hex = (bits: bigint) => bits.toString(16).padStart(16, "0");
/** `h` with `n` distinct bits flipped. */
const flip = (h: string, n: number, from = 0) => {
  let v = BigInt(`0x${h}`);
  for (let i = 0; i < n; i++) v ^= 1n << BigInt((from + i * 9) % 64);
  return hex(v);
};

describe("nearDuplicatesByHash", () => {
  it("finds every held-out hash within NEAR_DUPLICATE_BITS of a training hash, exactly (no band misses within 7 bits)", () => {
    const rand = rng(7);
    const random = () => hex((BigInt(Math.floor(rand() * 2 ** 32)) << 32n) | BigInt(Math.floor(rand() * 2 ** 32)));
    const train = new Map<string, string>(Array.from({ length: 500 }, (_, i) => [`t${i}`, random()] as const));
    const val = new Map<string, string>();
    for (let i = 0; i < 40; i++) val.set(`near${i}`, flip(train.get(`t${i * 11}`) as string, i % (NEAR_DUPLICATE_BITS + 1), i));
    for (let i = 0; i < 40; i++) val.set(`far${i}`, flip(train.get(`t${i * 11 + 3}`) as string, NEAR_DUPLICATE_BITS + 1 + (i % 3), i));
    const found = nearDuplicatesByHash(train, val);
    expect(found.map((d) => d.val).sort()).toEqual([...val.keys()].filter((k) => k.startsWith("near")).sort());
    for (const d of found) expect(hashDistance(val.get(d.val) as string, train.get(d.train) as string)).toBe(d.bits);
    // Up to 7 bits the banding misses nothing: the same pairs as an exhaustive comparison.
    const wide = nearDuplicatesByHash(train, val, 7);
    const exhaustive = [...val].filter(([, h]) => [...train.values()].some((t) => hashDistance(h, t) <= 7)).map(([id]) => id);
    expect(wide.map((d) => d.val).sort()).toEqual(exhaustive.sort());
  });
});

describe("separateNearDuplicates", () => {
  const img = (id: string, label: string) => ({ id, key: `datasets/d/${label}/${id}.png`, label });
  const hashes: Record<string, string> = {
    t1: "0f0f0f0f33333333",
    t2: "5555aaaa5555aaaa",
    v1: "0f0f0f0f33333332", // 1 bit from t1, same label
    v2: "5555aaaa5555aaab", // 1 bit from t2, other label
    blank: "0000000000000000",
    blankTrain: "0000000000000001",
  };

  it("leaves out a held-out copy of a training image of its label, not of another label, and ignores blank hashes", () => {
    const train = [img("t1", "cat"), img("t2", "dog"), img("blankTrain", "cat")];
    const val = [img("v1", "cat"), img("v2", "cat"), img("blank", "cat"), img("o1", "cat"), img("o2", "cat"), img("o3", "cat")];
    const r = separateNearDuplicates(train, val, (id) => hashes[id]);
    expect(r.dropped).toEqual([{ val: "v1", train: "t1", bits: 1, valKey: "datasets/d/cat/v1.png", trainKey: "datasets/d/cat/t1.png" }]);
    expect(r.warnings).toEqual([]);
  });

  it("keeps a label's held-out images when more than half of them look like copies, and says so", () => {
    const r = separateNearDuplicates([img("t1", "cat"), img("t2", "cat")], [img("v1", "cat"), img("v2", "cat"), img("o1", "cat")], (id) => hashes[id]);
    expect(r.dropped).toEqual([]);
    expect(r.warnings).toEqual([
      "2 of 3 held-out images of cat look like copies of training images; kept, so the held-out accuracy of cat may flatter the model",
    ]);
  });
});
