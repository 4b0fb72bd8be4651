/**
 * `npm run bench:edge -- --many` — one base, many models (issue #28), in one worker in local workerd:
 * N heads of one base (N = 1, 10, 100, 300 by default, `--heads`) requested round-robin, each request
 * followed by one to a single model (m0), so both streams meet the same contention on a shared machine:
 * p50/p99 of the round against the single-model p50 of the same rows, reloads during the round, isolate
 * memory; a new head's first answer with the base warm (and where its load time goes), also for heads
 * whose pointer predates `served` (`--unlisted`, 30 by default, interleaved with the others); one multi-model
 * classify of 10 heads against single-model requests interleaved with it.
 *
 * One head is trained; the others are that head's files published under other names (models/mK/…, with
 * their own metadata and pointer): each is fetched, verified and loaded as a model of its own, which is
 * what serving costs. Their whole-model files are not copied (a split version's worker never reads them).
 */
import { loadavg } from "node:os";
import sharp from "sharp";
import { readPromotedModel, writePointer } from "#shared/artifacts.ts";
import { SPLIT_FILES } from "#shared/contracts/artifact.ts";
import { sha256Hex } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import { startEdgeWorker } from "../infra/local/edge-worker.ts";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { sampleDataset } from "../jobs/train/src/dataset/sample.ts";
import { arg, BENCH_BASE, machine, percentile } from "./common.ts";
import { isolateHeap } from "./isolate-heap.ts";
import { trainSampleModel } from "./sample-model.ts";

const size = Number(arg("size", "160")) as 160;
const base = arg("base", BENCH_BASE) as string;
const counts = (arg("heads", "1,10,100,300") as string).split(",").map(Number);
const requests = Number(arg("requests", "300"));
const s3 = await startLocalS3();
await trainSampleModel(s3.store, { base, imageSize: size, model: "m0" });
const trained = await readPromotedModel(s3.store, "m0");
if (!trained.metadata.split) throw new Error("the trained model has no split form: nothing to benchmark");

/**
 * Publishes the trained head as model `name`: head files, metadata naming it, pointer. `listed`: the pointer
 * lists the files to fetch (`served`, as training writes it); false: a pointer written before it did.
 */
async function publishHead(name: string, listed = true): Promise<void> {
  const { metadata } = trained;
  const { served, ...old } = trained.pointer;
  if (!served) throw new Error("the trained pointer does not list its files: nothing to compare");
  const pointer = listed ? { ...old, served } : old;
  for (const f of [SPLIT_FILES.head, SPLIT_FILES.headWeights])
    await s3.store.put(keys.versionFile(name, metadata.version, f), trained.files.get(f) as Uint8Array);
  const text = `${JSON.stringify({ ...metadata, name }, null, 2)}\n`;
  await s3.store.put(keys.metadata(name, metadata.version), text, "application/json");
  await writePointer(s3.store, name, { ...pointer, metadataSha256: await sha256Hex(text), previous: null });
}
const maxHeads = Math.max(...counts);
for (let k = 1; k < maxHeads; k++) await publishHead(`m${k}`);
/** Heads whose pointer does not list the files (pointer → metadata → head, one after the other), for the same measurement. */
const unlisted = Number(arg("unlisted", "30"));
for (let k = 0; k < unlisted; k++) await publishHead(`u${k}`, false);

const sample = (await sampleDataset({ perLabel: 1, size: 512 }))[0]?.bytes as Uint8Array;
const jpeg = new Uint8Array(await sharp(sample).resize(size, size, { fit: "cover" }).jpeg({ quality: 90 }).toBuffer());
const edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 3600 });
const auth = { authorization: `Bearer ${edge.apiKey}` };
const post = async (path: string) => {
  const res = await fetch(`${edge.url}${path}`, { method: "POST", headers: { ...auth, "content-type": "image/jpeg" }, body: jpeg as BodyInit });
  const json = (await res.json()) as { timings?: { totalMs: number } };
  if (res.status !== 200) throw new Error(`${path}: ${res.status} ${JSON.stringify(json)}`);
  return (json.timings as { totalMs: number }).totalMs;
};
const classify = (name: string) => post(`/v1/models/${name}/classify`);
type Health = {
  models: { name: string; version: string | null }[];
  bases: { heads: number; loadedAt?: string }[];
  memory: { bytes: number; wasm: { total: number } };
};
const health = async () => (await (await fetch(`${edge.url}/healthz`, { headers: auth })).json()) as Health;
type Load = { loadedAt: string; fetchMs: number; parseMs: number; warmupMs: number };
const loadOf = async (n: string) => ((await (await fetch(`${edge.url}/v1/models/${n}`, { headers: auth })).json()) as { load: Load }).load;
const loads = async (names: string[]) => Promise.all(names.map(async (n) => (await loadOf(n)).loadedAt));
const sorted = (a: number[]) => [...a].sort((x, y) => x - y);
const mb = (bytes: number) => (bytes / 1024 / 1024).toFixed(1);

try {
  for (let i = 0; i < 10; i++) await classify("m0");
  const rows: string[] = [];
  const firstAnswers: number[] = [];
  const firstLoads: Load[] = [];
  const unlistedAnswers: number[] = [];
  const unlistedLoads: Load[] = [];
  /** Single-model requests interleaved with the new heads' first answers. */
  const singleAll: number[] = [];
  let loaded = 1;
  for (const n of counts) {
    // New heads, base warm: each one's first answer (fetch, verify, parse, check, classify).
    for (; loaded < n; loaded++) {
      firstAnswers.push(await classify(`m${loaded}`));
      firstLoads.push(await loadOf(`m${loaded}`));
      singleAll.push(await classify("m0"));
      // Every tenth new head, one whose pointer predates `served` (until there are none left), beside it.
      const u = unlistedAnswers.length;
      if (loaded % 10 === 0 && u < unlisted) {
        unlistedAnswers.push(await classify(`u${u}`));
        unlistedLoads.push(await loadOf(`u${u}`));
        singleAll.push(await classify("m0"));
      }
    }
    const names = Array.from({ length: n }, (_, k) => `m${k}`);
    const before = await loads(names);
    const times: number[] = [];
    const single: number[] = [];
    const rounds = Math.max(requests, n * 2);
    for (let i = 0; i < rounds; i++) {
      times.push(await classify(names[i % n] as string));
      single.push(await classify("m0"));
    }
    const reloaded = (await loads(names)).filter((t, k) => t !== before[k]).length;
    const h = await health();
    const s = sorted(times);
    const s1 = percentile(sorted(single), 50);
    rows.push(
      `| ${n} | ${rounds} | ${percentile(s, 50).toFixed(1)} / ${percentile(s, 99).toFixed(1)} ms | ${s1.toFixed(1)} ms | ${(percentile(s, 50) / s1).toFixed(2)} | ${reloaded} | ${h.bases.length} base, ${h.bases[0]?.heads} heads | ${mb(h.memory.bytes)} MB | ${mb(h.memory.wasm.total)} MB | ${edge.memoryMb().rss.toFixed(0)} MB |`,
    );
  }
  // Multi-model classify: 10 heads on one image, against one model's request interleaved with it.
  const ten = Array.from({ length: Math.min(10, maxHeads) }, (_, k) => `m${k}`).join(",");
  for (let i = 0; i < 5; i++) await post(`/v1/classify?models=${ten}`);
  const multi: number[] = [];
  const multiSingle: number[] = [];
  for (let i = 0; i < requests; i++) {
    multi.push(await post(`/v1/classify?models=${ten}`));
    multiSingle.push(await classify("m0"));
  }
  const singleP50 = percentile(sorted(singleAll), 50);

  const commit = (await import("node:child_process")).execSync("git describe --always --dirty", { encoding: "utf8" }).trim();
  console.log(
    `One base, many models: base ${base} at ${size} px, heads of 3 labels, one worker in local workerd (${machine()}; commit ${commit}; load average ${loadavg()
      .map((l) => l.toFixed(2))
      .join(" ")} at the end). Times are the worker's Server-Timing total (body, decode, preprocess, inference).\n`,
  );
  console.log(
    "| heads | requests (round-robin) | p50 / p99 | single model p50, interleaved | p50 / single p50 | models reloaded during the round | in memory | tensor bytes | wasm memory | workerd RSS |",
  );
  console.log("|---|---|---|---|---|---|---|---|---|---|");
  for (const r of rows) console.log(r);
  const firstLine = (what: string, answers: number[], loadTimes: Load[]) => {
    const f = sorted(answers);
    const med = (k: keyof Omit<Load, "loadedAt">) => percentile(sorted(loadTimes.map((l) => l[k])), 50).toFixed(1);
    if (f.length > 0)
      console.log(
        `${what} (${f.length} heads): p50 ${percentile(f, 50).toFixed(1)} ms, p99 ${percentile(f, 99).toFixed(1)} ms = ${(percentile(f, 50) / singleP50).toFixed(2)} × the warm single-model p50 (${singleP50.toFixed(1)} ms, interleaved); its load, median: fetch ${med("fetchMs")} ms, parse ${med("parseMs")} ms, check ${med("warmupMs")} ms`,
      );
  };
  console.log("");
  firstLine("a new head's first answer, base warm, pointer listing its files (pointer, then metadata beside head)", firstAnswers, firstLoads);
  firstLine("the same with a pointer written before it listed them (pointer, metadata, head in a chain)", unlistedAnswers, unlistedLoads);
  const m = sorted(multi);
  const m1 = percentile(sorted(multiSingle), 50);
  console.log(
    `multi-model classify of ${ten.split(",").length} heads: p50 ${percentile(m, 50).toFixed(1)} ms, p99 ${percentile(m, 99).toFixed(1)} ms = ${(percentile(m, 50) / m1).toFixed(2)} × one model's request interleaved with it (p50 ${m1.toFixed(1)} ms)`,
  );
  // The isolate's JS heap, after all timing (DevTools attaches a debugger): with every head, then a fresh
  // isolate with one head, so the difference is what the heads cost beside their tensors.
  const heapLine = async (worker: typeof edge) => {
    const heap = await isolateHeap(worker);
    const h = (await (await fetch(`${worker.url}/healthz`, { headers: auth })).json()) as Health;
    const what = `${h.bases.length} base, ${h.bases[0]?.heads} heads`;
    return typeof heap === "string"
      ? `${what}: ${heap}`
      : `${what}: ${mb(heap.usedBytes)} MB used of ${mb(heap.totalBytes)} MB (${heap.collected ? "after a full GC" : "GC not forced"}), wasm ${mb(h.memory.wasm.total)} MB`;
  };
  const many = await heapLine(edge);
  const fresh = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 3600, apiKey: edge.apiKey });
  try {
    await fetch(`${fresh.url}/v1/models/m0/classify`, { method: "POST", headers: { ...auth, "content-type": "image/jpeg" }, body: jpeg as BodyInit });
    console.log(`isolate JS heap (Runtime.getHeapUsage over DevTools): ${many}; a fresh isolate with ${await heapLine(fresh)}`);
  } finally {
    await fresh.stop();
  }
} finally {
  await edge.stop();
  await s3.stop();
}
