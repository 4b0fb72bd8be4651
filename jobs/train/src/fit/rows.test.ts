import { describe, expect, it } from "vitest";
import type { ObjectStore } from "#shared/s3/store.ts";
import { mulberry32 } from "../dataset/augment.ts";
import { decodePackHeader, encodePack, type Pack } from "../features/packs.ts";
import { packRows, type RowSource } from "./rows.ts";

/** An in-memory bucket (the storage boundary is faked here; training on real packs is train.test.ts's job) that counts GETs. */
function memoryStore() {
  const objects = new Map<string, Uint8Array>();
  const stats = { gets: 0 };
  const store = {
    async get(key: string) {
      stats.gets++;
      return objects.get(key) ?? null;
    },
    async *list(prefix: string) {
      for (const key of [...objects.keys()].sort()) if (key.startsWith(prefix)) yield { key, etag: "", size: 0 };
    },
  } as unknown as ObjectStore;
  return { store, objects, stats };
}

/** `packs` packs of `perPack` images with 2 views each; values encode (image, view) so rows can be checked. */
function fill(objects: Map<string, Uint8Array>, packs: number, perPack: number): Map<string, number> {
  const classOf = new Map<string, number>();
  for (let p = 0; p < packs; p++) {
    const pack: Pack = { shape: [2, 2], entries: [], failed: [] };
    for (let i = 0; i < perPack; i++) {
      const id = `img${p * perPack + i}`;
      classOf.set(id, (p * perPack + i) % 3);
      for (let view = 0; view < 2; view++) pack.entries.push({ id, view, values: Float32Array.from([p * perPack + i, view, 0.5, -1]) });
    }
    objects.set(`cache/embeddings/k/p${String(p).padStart(3, "0")}.bin`, encodePack(pack));
  }
  return classOf;
}

async function pass(source: RowSource, batchSize: number, seed: number | null) {
  const rows: { row: number; image: number; view: number }[] = [];
  for await (const b of source.batches(batchSize, seed === null ? null : mulberry32(seed))) {
    expect(b.values.length).toBe(b.ids.length * 4);
    b.ids.forEach((row, i) => {
      rows.push({ row, image: b.values[i * 4] as number, view: b.values[i * 4 + 1] as number });
    });
  }
  return rows;
}

/** The index the extraction hands over (Features.packs): pack key → its entries. */
function indexOf(objects: Map<string, Uint8Array>): Map<string, [string, number][]> {
  return new Map([...objects].map(([key, bytes]) => [key, decodePackHeader(bytes).entries]));
}

describe("packRows (fine-tuning maps streamed from their packs)", () => {
  it("gives every wanted row once per pass, with its class, and nothing else", async () => {
    const { store, objects } = memoryStore();
    const classOf = fill(objects, 6, 10);
    // Wanted: the even images, first view only; a duplicate pack of the same entries adds nothing.
    const wanted = new Map([...classOf].filter(([id]) => Number(id.slice(3)) % 2 === 0));
    objects.set("cache/embeddings/k/zzz.bin", objects.get("cache/embeddings/k/p000.bin") as Uint8Array);
    const source = packRows(store, indexOf(objects), [2, 2], [{ classOf: wanted, views: 1 }])[0] as RowSource;
    expect(source.shape).toEqual([2, 2]);
    expect(source.y.length).toBe(30);
    for (const seed of [null, 1]) {
      const rows = await pass(source, 7, seed);
      expect(rows.map((r) => r.row).sort((a, b) => a - b)).toEqual([...Array(30).keys()]);
      for (const r of rows) {
        expect(r.view).toBe(0);
        expect(r.image % 2).toBe(0);
        expect(source.y[r.row]).toBe(classOf.get(`img${r.image}`));
        expect(source.ids?.[r.row]).toBe(`img${r.image}`);
      }
    }
  });

  it("shuffles across packs, the same way for the same seed", async () => {
    const { store, objects } = memoryStore();
    const classOf = fill(objects, 8, 16);
    const source = packRows(store, indexOf(objects), [2, 2], [{ classOf, views: 2 }])[0] as RowSource;
    const a = (await pass(source, 16, 5)).map((r) => r.row);
    const b = (await pass(source, 16, 5)).map((r) => r.row);
    const c = (await pass(source, 16, 6)).map((r) => r.row);
    expect(a).toEqual(b);
    expect(a).not.toEqual(c);
    // A batch mixes rows of more than one pack (a pack's rows are 32 consecutive row numbers).
    const packsInFirstBatch = new Set(a.slice(0, 16).map((row) => Math.floor(row / 32)));
    expect(packsInFirstBatch.size).toBeGreaterThan(1);
    // In order (evaluation): row order.
    expect((await pass(source, 16, null)).map((r) => r.row)).toEqual([...Array(256).keys()]);
  });

  it("reads no pack to index the rows, and then packs as it goes: the first batch needs a few, not the dataset", async () => {
    const { store, objects, stats } = memoryStore();
    const classOf = fill(objects, 40, 8);
    const source = packRows(store, indexOf(objects), [2, 2], [{ classOf, views: 2 }])[0] as RowSource;
    expect(stats.gets).toBe(0); // the index says where every row is: no pack is read to find them
    const it = source.batches(8, mulberry32(1))[Symbol.asyncIterator]();
    await it.next();
    expect(stats.gets).toBeLessThanOrEqual(6); // PREFETCH + BUFFER_PACKS + what the pipeline keeps ahead
    await it.return?.();
  });
});
