import { pMapIterable } from "p-map";
import type { ObjectStore } from "../../../../shared/s3/store.ts";
import { decodePack, decodePackHeader } from "../features/packs.ts";

/**
 * Where training rows come from, a batch at a time. Pooled features are small and sit in memory
 * (`memoryRows`); the bottom maps of fine-tuning are ~75 KB per view at 224 px — 22 GB for 100 000
 * images × 3 views — so they are streamed from their cached packs every epoch (`packRows`), with a
 * shuffle buffer of a few packs: memory stays flat whatever the dataset size. Packs mix labels (their
 * images are in content-hash order, see extract.ts), so a buffer of a few packs is a fair sample.
 */
export interface RowSource {
  /** The shape of one row: [1280] for pooled features, [h, w, c] for maps. */
  readonly shape: number[];
  /** Class index per row; row i is the i-th row of an unshuffled pass. */
  readonly y: Int32Array;
  /** The image id of each row, where the source knows it (packs). */
  readonly ids?: readonly string[];
  /**
   * Every row once, in batches: shuffled with `rand` (training) or in row order (`null`: evaluation).
   * `values` holds the batch's rows one after the other.
   */
  batches(batchSize: number, rand: (() => number) | null): AsyncIterable<{ ids: Int32Array; values: Float32Array }>;
}

/** Rows already in memory; a training pass is one seeded shuffle of all of them. */
export function memoryRows(rows: readonly Float32Array[], shape: number[], y: Int32Array): RowSource {
  return {
    shape,
    y,
    async *batches(batchSize, rand) {
      const order = Int32Array.from({ length: rows.length }, (_, i) => i);
      if (rand) shuffle(order, rand);
      for (let b = 0; b < order.length; b += batchSize) {
        const ids = order.slice(b, Math.min(order.length, b + batchSize));
        yield { ids, values: concat(Array.from(ids, (i) => rows[i] as Float32Array)) };
      }
    },
  };
}

/** Packs decoded ahead of the one being consumed while streaming. */
const PREFETCH = 2;
/** Packs whose rows are mixed in the shuffle buffer. Memory: about (PREFETCH + BUFFER_PACKS) packs. */
const BUFFER_PACKS = 2;

/**
 * Rows streamed from the embedding packs under `prefix` (features/extract.ts), one source per wanted
 * set (training rows, held-out rows): the entries of its images (`classOf`: id → class) and views
 * `< views`. One pass reads every pack's header to index the rows of all sets; each training pass then
 * reads the packs again, in a shuffled order, a few at a time. Packs of other runs that share the cache
 * key are skipped after their header.
 */
export async function packRows(
  store: ObjectStore,
  prefix: string,
  sets: readonly { classOf: ReadonlyMap<string, number>; views: number }[],
): Promise<RowSource[]> {
  const keys: string[] = [];
  for await (const o of store.list(prefix)) keys.push(o.key);
  const index = sets.map(() => ({ packs: [] as PackRows[], y: [] as number[], ids: [] as string[], seen: new Set<string>() }));
  let shape: number[] = [];
  for await (const h of pMapIterable(keys, async (key) => ({ key, header: await readHeader(store, key) }), { concurrency: 8 })) {
    if (!h.header) continue;
    if (h.header.shape.length > 0) shape = h.header.shape;
    sets.forEach((set, s) => {
      const into = index[s] as (typeof index)[number];
      const rows: PackRows["rows"] = [];
      h.header?.entries.forEach(([id, view], entry) => {
        const cls = set.classOf.get(id);
        const tag = `${id}/${view}`;
        if (cls === undefined || view >= set.views || into.seen.has(tag)) return;
        into.seen.add(tag); // the same view in two packs (a repeated extraction): one row
        rows.push({ entry, row: into.y.length });
        into.y.push(cls);
        into.ids.push(id);
      });
      if (rows.length > 0) into.packs.push({ key: h.key, rows });
    });
  }
  return index.map((i) => streamedSource(store, shape, i.packs, Int32Array.from(i.y), i.ids));
}

interface PackRows {
  key: string;
  /** Which entries of the pack are rows of this source, and their row numbers. */
  rows: { entry: number; row: number }[];
}

function streamedSource(store: ObjectStore, shape: number[], packs: PackRows[], y: Int32Array, ids: string[]): RowSource {
  return {
    shape,
    y,
    ids,
    async *batches(batchSize, rand) {
      const order = packs.slice();
      if (rand) shuffle(order, rand);
      const dim = shape.reduce((a, b) => a * b, 1);
      const loaded = pMapIterable(
        order,
        async (p) => {
          const bytes = await store.get(p.key);
          if (!bytes) throw new Error(`embedding pack ${p.key} disappeared during training`);
          const pack = decodePack(bytes);
          return p.rows.map((r) => ({ row: r.row, values: (pack.entries[r.entry] as { values: Float32Array }).values }));
        },
        { concurrency: PREFETCH },
      );
      const buffer: { row: number; values: Float32Array }[] = [];
      let bufferTarget = 0;
      const take = (n: number) => {
        const out = new Float32Array(n * dim);
        const rows = new Int32Array(n);
        for (let i = 0; i < n; i++) {
          // Shuffled: a random row of the buffer (swap-remove); in order: the oldest.
          const j = rand ? Math.floor(rand() * buffer.length) : 0;
          const picked = buffer[j] as { row: number; values: Float32Array };
          if (rand) {
            buffer[j] = buffer[buffer.length - 1] as (typeof buffer)[number];
            buffer.pop();
          } else buffer.shift();
          rows[i] = picked.row;
          out.set(picked.values, i * dim);
        }
        return { ids: rows, values: out };
      };
      for await (const rows of loaded) {
        buffer.push(...rows);
        bufferTarget = Math.max(bufferTarget, rows.length * BUFFER_PACKS);
        while (buffer.length >= Math.max(batchSize, rand ? bufferTarget : batchSize)) yield take(batchSize);
      }
      while (buffer.length > 0) yield take(Math.min(batchSize, buffer.length));
    },
  };
}

async function readHeader(store: ObjectStore, key: string) {
  const bytes = await store.get(key);
  if (!bytes) return null;
  try {
    return decodePackHeader(bytes);
  } catch {
    return null; // a torn pack: extraction computes its images again into a new pack
  }
}

function shuffle<T>(a: { length: number; [i: number]: T }, rand: () => number): void {
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [a[i], a[j]] = [a[j] as T, a[i] as T];
  }
}

function concat(rows: readonly Float32Array[]): Float32Array {
  const dim = rows[0]?.length ?? 0;
  const out = new Float32Array(rows.length * dim);
  for (const [i, r] of rows.entries()) out.set(r, i * dim);
  return out;
}
