import { pMapIterable } from "p-map";
import type { ObjectStore } from "#shared/s3/store.ts";
import { decodePack } from "../features/packs.ts";

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
 * Rows streamed from embedding packs (features/extract.ts), one source per wanted set (training rows,
 * held-out rows): the entries of its images (`classOf`: id → class) and views `< views`. The index —
 * pack key → its entries, which the extraction already read or wrote (`Features.packs`) — says where
 * every row is, so no pack is read to find them; each training pass then reads the packs in a shuffled
 * order, a few at a time. Packs of other runs that share the cache key contribute no rows and are not read.
 */
export function packRows(
  store: ObjectStore,
  index: ReadonlyMap<string, readonly (readonly [string, number])[]>,
  shape: number[],
  sets: readonly { classOf: ReadonlyMap<string, number>; views: number }[],
): RowSource[] {
  const built = sets.map(() => ({ packs: [] as PackRows[], y: [] as number[], ids: [] as string[], seen: new Set<string>() }));
  // In key order, whatever order the extraction met the packs in: a resumed run numbers its rows (and
  // so shuffles them) exactly as the run it resumes.
  for (const key of [...index.keys()].sort()) {
    const entries = index.get(key) ?? [];
    sets.forEach((set, s) => {
      const into = built[s] as (typeof built)[number];
      const rows: PackRows["rows"] = [];
      entries.forEach(([id, view], entry) => {
        const cls = set.classOf.get(id);
        const tag = `${id}/${view}`;
        if (cls === undefined || view >= set.views || into.seen.has(tag)) return;
        into.seen.add(tag); // the same view in two packs (a repeated extraction): one row
        rows.push({ entry, row: into.y.length });
        into.y.push(cls);
        into.ids.push(id);
      });
      if (rows.length > 0) into.packs.push({ key, rows });
    });
  }
  return built.map((i) => streamedSource(store, shape, i.packs, Int32Array.from(i.y), i.ids));
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
