import { describe, expect, it } from "vitest";
import { hashDistance } from "../../../../shared/image/input-hash.ts";
import {
  NEAR_DUPLICATE_BITS,
  NEAR_DUPLICATE_COSINE,
  nearDuplicates,
  nearDuplicatesAcross,
  nearDuplicatesByHash,
  separateNearDuplicates,
} from "./near-duplicates.ts";

/** Seeded vectors shaped like pooled features (non-negative, a shared mean), and their near copies. */
function rng(seed: number) {
  let s = seed;
  return () => {
    s = (s * 1103515245 + 12345) % 2147483648;
    return s / 2147483648;
  };
}
const random = rng(42);
const vector = (dim = 256) => Float32Array.from({ length: dim }, () => Math.max(0, random() * 2 - 0.6));
const nudged = (v: Float32Array, amount: number) => v.map((x) => Math.max(0, x + (random() - 0.5) * amount));
const centredCosine = (a: Float32Array, b: Float32Array, mean: Float64Array) => {
  let d = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i++) {
    const x = (a[i] as number) - (mean[i] as number);
    const y = (b[i] as number) - (mean[i] as number);
    d += x * y;
    na += x * x;
    nb += y * y;
  }
  return d / Math.sqrt(na * nb);
};

describe("nearDuplicatesAcross", () => {
  it("finds held-out copies of training images (and only those), each with its training twin", () => {
    const train = new Map(Array.from({ length: 400 }, (_, i) => [`t${i}`, vector()] as const));
    const val = new Map<string, Float32Array>();
    for (let i = 0; i < 30; i++) val.set(`copy-of-t${i * 7}`, nudged(train.get(`t${i * 7}`) as Float32Array, 0.15));
    for (let i = 0; i < 100; i++) val.set(`new${i}`, vector());
    const found = nearDuplicatesAcross(train, val);
    expect(found.map((d) => d.val).sort()).toEqual([...val.keys()].filter((k) => k.startsWith("copy")).sort());
    for (const d of found) expect(d.val).toBe(`copy-of-${d.train}`);
    for (const d of found) expect(d.similarity).toBeGreaterThanOrEqual(NEAR_DUPLICATE_COSINE);
  });

  it("agrees with an exhaustive comparison (the hashing loses no pair above the threshold here)", () => {
    const train = new Map(Array.from({ length: 200 }, (_, i) => [`t${i}`, vector(128)] as const));
    // A spread of similarities around the threshold.
    const val = new Map(Array.from({ length: 200 }, (_, i) => [`v${i}`, nudged(train.get(`t${i}`) as Float32Array, 0.2 + (i % 20) * 0.15)] as const));
    const all = [...train.values(), ...val.values()];
    const mean = new Float64Array(128);
    for (const v of all) for (let i = 0; i < 128; i++) mean[i] = (mean[i] as number) + (v[i] as number) / all.length;
    const exhaustive = [...val.entries()]
      .filter(([, v]) => [...train.values()].some((t) => centredCosine(v, t, mean) >= NEAR_DUPLICATE_COSINE))
      .map(([id]) => id)
      .sort();
    expect(exhaustive.length).toBeGreaterThan(20);
    expect(exhaustive.length).toBeLessThan(180);
    expect(
      nearDuplicatesAcross(train, val)
        .map((d) => d.val)
        .sort(),
    ).toEqual(exhaustive);
  });

  it("returns nothing when a side is empty", () => {
    expect(nearDuplicatesAcross(new Map(), new Map([["v", vector()]]))).toEqual([]);
  });
});

describe("nearDuplicatesByHash", () => {
  const hex = (bits: bigint) => bits.toString(16).padStart(16, "0");
  const flip = (h: string, n: number, from = 0) => {
    let v = BigInt(`0x${h}`);
    for (let i = 0; i < n; i++) v ^= 1n << BigInt((from + i * 9) % 64);
    return hex(v);
  };
  it("finds every held-out hash within NEAR_DUPLICATE_BITS of a training hash, exactly (no band misses within 7 bits)", () => {
    const rand = rng(7);
    const random = () => hex((BigInt(Math.floor(rand() * 2 ** 32)) << 32n) | BigInt(Math.floor(rand() * 2 ** 32)));
    const train = new Map<string, string>(Array.from({ length: 500 }, (_, i) => [`t${i}`, random()] as const));
    const val = new Map<string, string>();
    for (let i = 0; i < 40; i++) val.set(`near${i}`, flip(train.get(`t${i * 11}`) as string, i % (NEAR_DUPLICATE_BITS + 1), i));
    for (let i = 0; i < 40; i++) val.set(`far${i}`, flip(train.get(`t${i * 11 + 3}`) as string, NEAR_DUPLICATE_BITS + 1 + (i % 3), i));
    const found = nearDuplicatesByHash(train, val);
    expect(found.map((d) => d.val).sort()).toEqual([...val.keys()].filter((k) => k.startsWith("near")).sort());
    for (const d of found) expect(hashDistance(val.get(d.val) as string, train.get(d.train) as string)).toBe(d.similarity);
  });

  it("combines both signals, the hash first", () => {
    const v = vector();
    const found = nearDuplicates(
      { vectors: new Map([["t", v]]), hashes: new Map([["t", "00ff00ff00ff00ff"]]) },
      { vectors: new Map([["v", vector()]]), hashes: new Map([["v", "00ff00ff00ff00fe"]]) },
    );
    expect(found).toEqual([{ val: "v", train: "t", by: "hash", similarity: 1 }]);
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
  const vectors = new Map(Object.keys(hashes).map((k) => [k, vector()]));

  it("leaves out a held-out copy of a training image of its label, not of another label, and ignores blank hashes", () => {
    const train = [img("t1", "cat"), img("t2", "dog"), img("blankTrain", "cat"), ...Array.from({ length: 6 }, (_, i) => img(`x${i}`, "cat"))];
    const val = [img("v1", "cat"), img("v2", "cat"), img("blank", "cat"), img("o1", "cat"), img("o2", "cat"), img("o3", "cat")];
    const r = separateNearDuplicates(
      train,
      val,
      (id) => vectors.get(id) ?? vector(),
      (id) => hashes[id],
    );
    expect(r.dropped.map((d) => [d.val, d.train, d.by, d.valKey])).toEqual([["v1", "t1", "hash", "datasets/d/cat/v1.png"]]);
    expect(r.warnings).toEqual([]);
  });

  it("keeps a label's held-out images when more than half of them look like copies, and says so", () => {
    const train = [img("t1", "cat"), img("t2", "cat")];
    const val = [img("v1", "cat"), img("v2", "cat"), img("o1", "cat")];
    const r = separateNearDuplicates(
      train,
      val,
      (id) => vectors.get(id) ?? vector(),
      (id) => hashes[id],
    );
    expect(r.dropped).toEqual([]);
    expect(r.warnings).toEqual([
      "2 of 3 held-out images of cat look like copies of training images; kept, so the held-out accuracy of cat may flatter the model",
    ]);
  });
});
