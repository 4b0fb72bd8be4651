/**
 * `npm run bench:edge -- --answers` — what the calibrated answer costs at the edge (issue #29), side by
 * side in one worker in local workerd: the trained version as it is (temperature folded into its last
 * layer, per-label thresholds and a novelty floor in its metadata: classify reads the features' similarity
 * to the labels and decides label / unsure / none of these, capture asks the version's own "unsure")
 * against the same head published as a second model whose metadata has no calibration, thresholds or
 * novelty floor (what a version trained before #29 gives: top-k scores only).
 * Requests alternate between the two (the order swapped every round), so both meet the same contention;
 * besides each side's percentiles, the median of the rounds' paired ratios (less moved by load that drifts).
 * The folded temperature changes weight values, not operations, so the weights are shared as they are.
 */
import { loadavg } from "node:os";
import sharp from "sharp";
import { readPromotedModel } from "#shared/artifacts.ts";
import { type ArtifactMetadata, SPLIT_FILES } from "#shared/contracts/artifact.ts";
import { CLASS_MEANS_FILE } from "#shared/novelty.ts";
import { startEdgeWorker } from "../infra/local/edge-worker.ts";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { sampleDataset } from "../jobs/train/src/dataset/sample.ts";
import { publishCopy } from "../test/support/versions.ts";
import { arg, BENCH_BASE, machine, percentile } from "./common.ts";
import { trainSampleModel } from "./sample-model.ts";

const size = Number(arg("size", "160")) as 160;
const base = arg("base", BENCH_BASE) as string;
const requests = Number(arg("requests", "300"));
const s3 = await startLocalS3();
await trainSampleModel(s3.store, { base, imageSize: size, model: "calibrated" });
const trained = await readPromotedModel(s3.store, "calibrated");
if (!trained.metadata.split) throw new Error("the trained model has no split form: nothing to benchmark");
if (!trained.metadata.thresholds || !trained.metadata.calibration || !trained.metadata.novelty)
  throw new Error("the trained version has no thresholds, calibration or novelty floor: nothing to compare");

/**
 * `--whole`: both sides served as whole models (the form of a fine-tuned version: no split, so the worker
 * runs the whole classifier — through a two-output view for the novelty rule), else as split heads.
 */
const whole = process.argv.includes("--whole");
const headFiles = Object.values(SPLIT_FILES) as string[];
type Metadata = Omit<ArtifactMetadata, "files">;
// "plain": the same weights, its metadata without the answer rules (and without the novelty rule's file).
const plain = ({ calibration: _c, thresholds: _t, noneLabel: _n, novelty: _v, ...rules }: Metadata): Metadata => rules;
const wholeOnly = ({ split: _s, ...m }: Metadata): Metadata => m;
const [A, B] = whole ? (["calibrated-whole", "plain-whole"] as const) : (["calibrated", "plain"] as const);
if (whole) {
  await publishCopy(s3.store, "calibrated", A, { edit: wholeOnly, drop: headFiles });
  await publishCopy(s3.store, "calibrated", B, { edit: (m) => plain(wholeOnly(m)), drop: [...headFiles, CLASS_MEANS_FILE] });
} else await publishCopy(s3.store, "calibrated", B, { edit: plain, drop: [CLASS_MEANS_FILE] });

const sample = (await sampleDataset({ perLabel: 1, size: 512 }))[0]?.bytes as Uint8Array;
const jpeg = new Uint8Array(await sharp(sample).resize(size, size, { fit: "cover" }).jpeg({ quality: 90 }).toBuffer());
const edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 3600 });
const classify = async (name: string) => {
  const t = performance.now();
  const res = await fetch(`${edge.url}/v1/models/${name}/classify`, {
    method: "POST",
    headers: { authorization: `Bearer ${edge.apiKey}`, "content-type": "image/jpeg" },
    body: jpeg as BodyInit,
  });
  const json = (await res.json()) as { timings?: { totalMs: number }; unsure?: boolean; similarity?: number };
  if (res.status !== 200) throw new Error(`${name}: ${res.status} ${JSON.stringify(json)}`);
  // Each side must be what it claims: the rule applied on one, absent on the other.
  if ((name === A) !== (json.similarity !== undefined)) throw new Error(`${name} answered ${json.similarity === undefined ? "without" : "with"} a similarity`);
  return { e2e: performance.now() - t, total: (json.timings as { totalMs: number }).totalMs, answered: json.unsure !== undefined };
};
const runs = { calibrated: { e2e: [] as number[], total: [] as number[] }, plain: { e2e: [] as number[], total: [] as number[] } };
const served = { calibrated: A, plain: B } as const;
for (let i = 0; i < 10; i++) for (const name of [A, B]) await classify(name);
const loadBefore = loadavg()[0] as number;
for (let i = 0; i < requests; i++) {
  for (const side of i % 2 === 0 ? (["calibrated", "plain"] as const) : (["plain", "calibrated"] as const)) {
    const r = await classify(served[side]);
    runs[side].e2e.push(r.e2e);
    runs[side].total.push(r.total);
  }
}
await edge.stop();
await s3.stop();

const sorted = (a: number[]) => [...a].sort((x, y) => x - y);
const p = (a: number[], q: number) => percentile(sorted(a), q);
const fmt = (a: number[]) => `${p(a, 50).toFixed(2)} / ${p(a, 95).toFixed(2)} / ${p(a, 99).toFixed(2)} ms`;
console.log(
  `Calibrated answer vs none, one worker in local workerd, base ${base} at ${size} px, ${whole ? "whole models" : "split heads"}, ${requests} requests each, alternating (${machine()}; load average ${loadBefore.toFixed(2)} → ${(loadavg()[0] as number).toFixed(2)})\n`,
);
console.log("| model | end-to-end p50 / p95 / p99 | inside the worker (Server-Timing total) p50 / p95 / p99 |\n|---|---|---|");
console.log(
  `| calibrated: temperature folded, per-label thresholds, novelty floor (features read back, similarity), unsure / none answer | ${fmt(runs.calibrated.e2e)} | ${fmt(runs.calibrated.total)} |`,
);
console.log(`| plain: same weights, no calibration, thresholds or novelty floor in its metadata | ${fmt(runs.plain.e2e)} | ${fmt(runs.plain.total)} |`);
const paired = (a: number[], b: number[]) => percentile(sorted(a.map((v, i) => v / (b[i] as number))), 50);
console.log(
  `\nmedian of paired ratios (calibrated / plain, same round): end-to-end ${paired(runs.calibrated.e2e, runs.plain.e2e).toFixed(3)}, inside the worker ${paired(runs.calibrated.total, runs.plain.total).toFixed(3)}`,
);
console.log(
  `calibrated / plain, p50: end-to-end ${(p(runs.calibrated.e2e, 50) / p(runs.plain.e2e, 50)).toFixed(3)}, inside the worker ${(p(runs.calibrated.total, 50) / p(runs.plain.total, 50)).toFixed(3)}`,
);
