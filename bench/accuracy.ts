#!/usr/bin/env node
/**
 * `npm run bench:accuracy` — accuracy of every base available here × both strategies on the
 * reference datasets in ../shared/data, next to the published numbers. Slow (tens of minutes at
 * 224 px on 2 cores); `--datasets hymenoptera_data --bases nsfwjs-mobilenet-v2 --size 160` narrows it.
 * Bases come from ../shared/models (bench/common.ts); `--bases mobilenet-v2-100` adds the Keras
 * MobileNetV2, downloaded once (needs the internet and `EDGETUNE_OFFLINE=0`). A run that fails is
 * recorded (row with its error) and the others go on.
 * Results: bench/results/accuracy.jsonl (appended) and a markdown table on stdout.
 */
import { appendFile } from "node:fs/promises";
import { join } from "node:path";
import { userMessage } from "#shared/errors.ts";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { pushDataset } from "../jobs/train/src/catalog/catalog.ts";
import { createLogger } from "../jobs/train/src/log.ts";
import { initBackend } from "../jobs/train/src/model/backend.ts";
import { ensureBase, KNOWN_BASES } from "../jobs/train/src/model/bases.ts";
import { train } from "../jobs/train/src/train.ts";
import { arg, hasShared, machine, SHARED } from "./common.ts";

const DATASETS: Record<string, { reference: string }> = {
  hymenoptera_data: { reference: "95.4 % (ResNet-18 fixed features), 92.8 % fine-tuned" },
  cats_and_dogs_filtered: { reference: "94–95 % frozen MobileNetV2 160 px, 97–98 % fine-tuned" },
  flowers128: { reference: "85–92 % (MobileNetV2 transfer)" },
};
// Every base edgetune knows by name; the ones only a download provides only when asked for by name.
const online = (id: string) => KNOWN_BASES.find((b) => b.id === id)?.sources.every((s) => s.kind === "url") ?? false;
const datasets = (arg("datasets") ?? Object.keys(DATASETS).join(",")).split(",");
const bases = (
  arg("bases") ??
  KNOWN_BASES.filter((b) => !online(b.id))
    .map((b) => b.id)
    .join(",")
).split(",");
const strategies = (arg("strategies") ?? "head,finetune").split(",") as ("head" | "finetune")[];
const size = Number(arg("size", "224")) as 224;
const views = Number(arg("views", "3"));
// `--pooled a,b` (or `--pooled none`): measure a head on other pooled layers than the base's own, to choose them.
const pooled = arg("pooled");
if (pooled !== undefined) {
  for (const id of bases) {
    const known = KNOWN_BASES.find((b) => b.id === id) as { pooledLayers?: readonly string[] } | undefined;
    if (known) known.pooledLayers = pooled === "none" ? [] : pooled.split(",");
  }
}

if (!hasShared("data")) {
  console.log("../shared/data is absent: nothing to benchmark.");
  process.exit(0);
}
const backend = await initBackend();
const s3 = await startLocalS3();
const log = createLogger({ json: true, quiet: true, stream: { write: () => true } as unknown as NodeJS.WriteStream });
const rows: string[] = [];
for (const base of bases) {
  try {
    // "auto" and "best" are resolved by the run itself (model/bases.ts, model/choose-base.ts).
    if (base !== "auto" && base !== "best") await ensureBase(s3.store, base);
  } catch (e) {
    console.log(`skipped ${base}: ${userMessage(e)}`);
    continue;
  }
  for (const dataset of datasets) {
    if (!hasShared("data", dataset)) continue;
    const name = dataset.replaceAll("_", "-");
    if (!(await s3.store.head(`datasets/${name}/manifest.json`))) await pushDataset(s3.store, join(SHARED, "data", dataset), name);
    for (const strategy of strategies) {
      const t0 = performance.now();
      const model = `${name}-${base}-${strategy}`;
      const run = { date: new Date().toISOString(), dataset, base, strategy, size, views, ...(pooled !== undefined ? { pooled } : {}) };
      const record = async (row: object, accuracy: string, seconds: number) => {
        await appendFile(join(import.meta.dirname, "results", "accuracy.jsonl"), `${JSON.stringify(row)}\n`);
        const line = `| ${dataset} | ${base}${r?.report?.base.choice ? ` → ${r.report.base.id}` : ""} | ${strategy} | ${size} | ${accuracy} | ${seconds.toFixed(0)} s | ${DATASETS[dataset]?.reference ?? ""} |`;
        rows.push(line);
        console.log(line);
      };
      let r: Awaited<ReturnType<typeof train>> | undefined;
      try {
        r = await train(s3.store, { dataset: name, model, base, strategy, imageSize: size, views, force: true }, log);
      } catch (e) {
        // A failed run is a result too (e.g. a storage error): recorded, and the other runs go on.
        const seconds = (performance.now() - t0) / 1000;
        await record({ ...run, error: userMessage(e), seconds, machine: machine() }, `failed: ${userMessage(e)}`, seconds);
        continue;
      }
      const seconds = (performance.now() - t0) / 1000;
      const row = {
        ...run,
        accuracy: r.accuracy,
        evaluatedOn: r.report?.metrics.evaluatedOn,
        // Held-out images left out of the evaluation as near-identical to a training image of their label.
        nearDuplicates: r.report?.nearDuplicates.length,
        // With base auto or best: which base and why (best: every candidate's cross-validated score).
        baseChoice: r.report?.base.choice,
        seconds,
        features: r.report?.phases.find((p) => p.name === "features")?.detail,
        backend: backend.name,
        machine: machine(),
      };
      // To look at the pairs: EDGETUNE_DUMP_NEAR_DUPLICATES=/tmp/pairs.jsonl npm run bench:accuracy …
      if (process.env.EDGETUNE_DUMP_NEAR_DUPLICATES) {
        await appendFile(process.env.EDGETUNE_DUMP_NEAR_DUPLICATES, `${JSON.stringify({ dataset, pairs: r.report?.nearDuplicates })}\n`);
      }
      const near = r.report?.nearDuplicates.length ? `; ${r.report.nearDuplicates.length} near-duplicates left out` : "";
      await record(row, `${((r.accuracy ?? 0) * 100).toFixed(1)} % (${r.report?.metrics.evaluatedOn}${near})`, seconds);
    }
  }
}
await s3.stop();
console.log(`\n| dataset | base | strategy | px | val accuracy (n) | wall | published reference |\n|---|---|---|---|---|---|---|\n${rows.join("\n")}`);
