#!/usr/bin/env node
/**
 * `npm start`: the whole edgetune loop on this machine, no AWS or Cloudflare account needed.
 *   1. a local S3 API server (fauxqs) on loopback, with the bucket;
 *   2. the default base model (from ../shared/models where it exists, else the nsfwjs one) and a real sample dataset (Twemoji images in
 *      3 labels) pushed into it, manifest last (it asks for 128 px: small icons);
 *   3. the dispatcher sees the manifest, as the EventBridge rule would, and runs the training job
 *      through the same CLI as the Batch container; the model is evaluated and promoted;
 *   4. the edge worker starts in local workerd (wrangler dev) against the bucket (it starts while the model trains);
 *   5. held-out images are classified over HTTP, and a ready-to-paste curl command is printed;
 *   6. a second model (2 of the labels) trained on the same base and size is served by the same worker
 *      as a head on the one shared base, and both answer one image in one request (/v1/classify?models=).
 * Then it serves until Ctrl-C, with the nightly stand-in (review decisions applied, changed datasets retrained)
 * every EDGETUNE_NIGHTLY_MINUTES (default 2; 0 turns it off).
 * Ports: EDGETUNE_LOCAL_S3_PORT and EDGETUNE_EDGE_PORT (default: free ones), checked before anything starts.
 */
import { existsSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { readPointer } from "#shared/artifacts.ts";
import { EdgetuneError, userMessage } from "#shared/errors.ts";
import { keys } from "#shared/keys.ts";
import { SAMPLE_CREDIT, sampleDataset } from "../../jobs/train/src/dataset/sample.ts";
import { initBackend } from "../../jobs/train/src/model/backend.ts";
import { AUTO_BASE, resolveBase } from "../../jobs/train/src/model/bases.ts";
import { percent, table } from "../../jobs/train/src/output.ts";
import { Dispatcher } from "./dispatcher.ts";
import { type EdgeWorker, freePort, startEdgeWorker } from "./edge-worker.ts";
import { startLocalS3 } from "./s3-server.ts";

const t0 = performance.now();
const elapsed = () => `${((performance.now() - t0) / 1000).toFixed(1)} s`;
const say = (m: string) => process.stdout.write(`[${elapsed().padStart(7)}] ${m}\n`);
const DATASET = "emoji";
/** A second model of the same base and size: the worker serves both heads on one copy of the base. */
const SECOND = "emoji-duo";
const once = process.argv.includes("--once");
// Short by default: console decisions and the Monitor page wait for this run (a day in the cloud).
const NIGHTLY_MINUTES = Number(process.env.EDGETUNE_NIGHTLY_MINUTES ?? 2);

const cleanups: (() => Promise<void>)[] = [];
async function shutdown(code: number): Promise<never> {
  for (const c of cleanups.reverse()) await c().catch(() => {});
  process.exit(code);
}
process.on("SIGINT", () => {
  process.stdout.write("\nStopping…\n");
  void shutdown(0);
});
process.on("SIGTERM", () => void shutdown(0));

/** A port asked for by a variable must be free now, not after a minute of training. */
async function checkPort(variable: string): Promise<number> {
  const raw = process.env[variable];
  if (!raw) return 0;
  const port = Number(raw);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new EdgetuneError("invalid_option", `${variable}=${raw} is not a port number (1–65535).`);
  await new Promise<void>((resolve, reject) => {
    const probe = createServer();
    probe.once("error", () =>
      reject(
        new EdgetuneError(
          "port_busy",
          `Port ${port} (${variable}) is in use: stop what uses it, or set ${variable} to another port (or unset it for a free one).`,
        ),
      ),
    );
    probe.listen(port, "127.0.0.1", () => probe.close(() => resolve()));
  });
  return port;
}

// The local stack never downloads: bases come from ../shared/models where it exists (no weights are
// committed), else `auto` ends at the nsfwjs base that installs with the project. Job processes inherit it.
const sharedModels = join(import.meta.dirname, "..", "..", "..", "shared", "models");
if (existsSync(sharedModels)) process.env.EDGETUNE_BASES_DIR ||= sharedModels;
process.env.EDGETUNE_OFFLINE ||= "1";
// The operator key (also the console's): nightly runs apply review decisions signed with it.
process.env.EDGETUNE_API_KEY ||= "local-dev-key";
process.env.EDGETUNE_CONSOLE_KEYS ||= process.env.EDGETUNE_API_KEY;

try {
  const s3Port = await checkPort("EDGETUNE_LOCAL_S3_PORT");
  const edgePort = await checkPort("EDGETUNE_EDGE_PORT");
  const s3 = await startLocalS3({ bucket: "edgetune-local", port: s3Port });
  cleanups.push(() => s3.stop());
  say(`local S3 API on ${s3.endpoint} (bucket ${s3.config.bucket})`);

  await initBackend();
  const { base, from } = await resolveBase(s3.store, process.env.EDGETUNE_DEFAULT_BASE || AUTO_BASE);
  say(`base model ${base.id} from ${from}, stored under ${keys.base(base.id)} (${(base.files.reduce((n, f) => n + f.bytes, 0) / 1e6).toFixed(1)} MB)`);

  const dispatcher = new Dispatcher({
    store: s3.store,
    s3: s3.config,
    pollMs: 500,
    nightlyMs: once ? undefined : NIGHTLY_MINUTES * 60_000 || undefined,
    trainArgs: [],
    output: "pretty",
    onJob: (job) => {
      if (job.reason === "console-request") {
        for (const r of job.outcomes ?? []) say(`console request: ${r.model} ${r.kind}${r.version ? ` ${r.version}` : ""}: ${r.state}: ${r.message}`);
        return;
      }
      if (job.status === "running") say(`training job started for ${job.dataset} (${job.reason})`);
      if (job.status === "succeeded")
        for (const r of job.results)
          say(
            // A version that exists was not evaluated again: no accuracy to print ("Train now" on unchanged data).
            r.status === "exists"
              ? `job done: ${r.model} ${r.version}: ${r.reason}`
              : `job done: ${r.model} ${r.version} ${r.promoted ? "promoted" : "not promoted"}, accuracy ${((r.accuracy ?? 0) * 100).toFixed(1)} % (${r.reason})`,
          );
      if (job.status === "failed") say(`training job for ${job.dataset} failed: ${job.failure ?? `exit ${job.exitCode}`}`);
    },
  });
  dispatcher.start();
  cleanups.push(() => dispatcher.stop());

  // The edge worker starts while the model trains: wrangler's bundling and workerd's start (≈ 2 s) need
  // not wait for it. It reads the model pointer on its first request, after the promotion.
  const port = edgePort || (await freePort());
  const edgeStarting = startEdgeWorker({
    s3Endpoint: s3.endpoint,
    bucket: s3.config.bucket,
    port,
    apiKey: process.env.EDGETUNE_API_KEY,
    pointerTtlSeconds: 10,
  });
  edgeStarting.catch(() => {}); // a failed start is reported where it is awaited, below
  cleanups.push(async () => (await edgeStarting.catch(() => undefined))?.stop());

  // A real sample dataset: 30 Twemoji images per label to train on, 4 more per label held out.
  const train = await sampleDataset({ perLabel: 30, size: 128 });
  const unseen = (await sampleDataset({ perLabel: 40, size: 128 })).filter((h) => !train.some((t) => t.file === h.file));
  const heldOut = ["animals", "food", "travel"].flatMap((label) => unseen.filter((h) => h.label === label).slice(0, 4));
  await Promise.all(train.map((i) => s3.store.put(`${keys.dataset(DATASET)}${i.file}`, i.bytes)));
  // 128 px for 128 px icons, said where any later run (CLI, nightly) reads it: the manifest.
  await s3.store.put(keys.manifest(DATASET), JSON.stringify({ schemaVersion: 1, imageCount: train.length, imageSize: 128 }));
  say(`pushed dataset ${DATASET}: ${train.length} images in 3 labels (${SAMPLE_CREDIT}); manifest written last`);

  const promoted = async (names: string[]) => {
    while (!(await Promise.all(names.map((n) => readPointer(s3.store, n)))).every(Boolean)) {
      if (dispatcher.jobs.some((j) => j.status === "failed")) throw new EdgetuneError("training_failed", "Training failed; see the log above.");
      // A run that ended without promoting (the promotion rules kept it back) will not promote later.
      const kept = dispatcher.jobs.flatMap((j) => (j.status === "succeeded" ? j.results : [])).find((r) => !r.promoted);
      if (kept) throw new EdgetuneError("not_promoted", `The model was trained but not promoted: ${kept.reason}`);
      await new Promise((r) => setTimeout(r, 300));
    }
  };
  await promoted([DATASET]);
  say(`model ${DATASET} promoted`);
  // The second model (one base, many models) is pushed once the first is served: its training runs while
  // the first answers, instead of before it.
  const duo = train.filter((i) => i.label !== "travel");
  await Promise.all(duo.map((i) => s3.store.put(`${keys.dataset(SECOND)}${i.file}`, i.bytes)));
  await s3.store.put(keys.manifest(SECOND), JSON.stringify({ schemaVersion: 1, imageCount: duo.length, imageSize: 128 }));
  say(`pushed dataset ${SECOND}: ${duo.length} images in 2 labels; manifest written last`);

  const edge = await edgeStarting;
  say(`edge worker (workerd) on ${edge.url}`);

  let first = true;
  let correct = 0;
  let unsure = 0;
  let none = 0;
  const rows: string[][] = [];
  for (const img of heldOut) {
    const res = await fetch(`${edge.url}/v1/models/${DATASET}/classify?top_k=2`, {
      method: "POST",
      headers: { authorization: `Bearer ${edge.apiKey}`, "content-type": img.file.endsWith(".jpg") ? "image/jpeg" : "image/png" },
      body: img.bytes as BodyInit,
    });
    const body = (await res.json()) as {
      predictions?: { label: string; score: number }[];
      unsure?: boolean;
      none?: boolean;
      timings?: { totalMs: number };
      error?: { message: string };
    };
    if (first) {
      say(`first classification from the edge (time from start: ${elapsed()})`);
      first = false;
    }
    const top = body.predictions?.[0];
    if (top?.label === img.label) correct++;
    if (body.unsure) unsure++;
    if (body.none) none++;
    // As the API answers: below its label's threshold the top label is a guess, not an answer (#29).
    const predicted = !top ? (body.error?.message ?? "") : body.none ? "none of these" : body.unsure ? `unsure (${top.label}?)` : top.label;
    rows.push([
      img.file,
      String(res.status),
      predicted,
      top ? percent(top.score) : "",
      top?.label === img.label ? "✓" : "✗",
      `${body.timings?.totalMs ?? "-"} ms`,
    ]);
  }
  const heldOutTable = table(["IMAGE", "HTTP", "PREDICTED", "SCORE", "", "WORKER"], rows).replace(/^/gm, "  ");
  // Not the training run's held-out split (its accuracy is in the report): images the dataset never had.
  process.stdout.write(
    `\nImages not in the dataset, classified by the edge worker (top label right for ${correct}/${heldOut.length}; ${unsure} answered unsure, the top score below its label's threshold; ${none} none of these):\n${heldOutTable}\n`,
  );
  await promoted([SECOND]);
  say(`model ${SECOND} promoted`);
  await showSharedBase(edge, heldOut[1] ?? (heldOut[0] as (typeof heldOut)[number]));
  const sampleDir = await mkdtemp(join(tmpdir(), "edgetune-sample-"));
  cleanups.push(() => rm(sampleDir, { recursive: true, force: true }));
  const sample = heldOut[0] as (typeof heldOut)[number];
  const samplePath = join(sampleDir, sample.file.replace("/", "-"));
  await writeFile(samplePath, sample.bytes);
  process.stdout.write(
    `\nTry it:\n  curl -s -X POST '${edge.url}/v1/models/${DATASET}/classify?top_k=3' \\\n    -H 'Authorization: Bearer ${edge.apiKey}' -H 'Content-Type: ${sample.file.endsWith(".jpg") ? "image/jpeg" : "image/png"}' \\\n    --data-binary @${samplePath}\n`,
  );
  // Everything the CLI needs, classify included: paste the export once, then any command.
  const cliEnv = `EDGETUNE_BUCKET=${s3.config.bucket} EDGETUNE_S3_ENDPOINT=${s3.endpoint} AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local EDGETUNE_EDGE_URL=${edge.url} EDGETUNE_API_KEY=${edge.apiKey}`;
  process.stdout.write(
    `\nThe CLI against this stack:\n  export ${cliEnv}\n  npx edgetune models ${DATASET}\n  npx edgetune classify ${DATASET} ${samplePath}\n`,
  );
  process.stdout.write(
    `\nBoth models, one image, one request:\n  curl -s -X POST '${edge.url}/v1/classify?models=${DATASET},${SECOND}&top_k=1' \\\n    -H 'Authorization: Bearer ${edge.apiKey}' -H 'Content-Type: ${sample.file.endsWith(".jpg") ? "image/jpeg" : "image/png"}' \\\n    --data-binary @${samplePath}\n`,
  );
  process.stdout.write(`\nThe web console: ${edge.url}/ (API key ${edge.apiKey})\n`);
  if (once) await shutdown(correct > 0 ? 0 : 1);
  process.stdout.write(
    NIGHTLY_MINUTES > 0
      ? `\nThe nightly stand-in runs every ${NIGHTLY_MINUTES} minute(s) (EDGETUNE_NIGHTLY_MINUTES; 0 turns it off): it applies review decisions, fills the Monitor page and retrains changed datasets.\n`
      : "\nThe nightly stand-in is off (EDGETUNE_NIGHTLY_MINUTES=0): review decisions made in the console wait for edgetune review or a run.\n",
  );
  process.stdout.write("\nServing until Ctrl-C.\n");
} catch (e) {
  process.stderr.write(`edgetune start: ${userMessage(e)}\n`);
  if (process.env.EDGETUNE_DEBUG) console.error(e);
  await shutdown(1);
}

/** Both models answer one image in one request; /healthz shows one base held by both heads. */
async function showSharedBase(edge: EdgeWorker, img: { file: string; bytes: Uint8Array }): Promise<void> {
  const auth = { authorization: `Bearer ${edge.apiKey}` };
  const res = await fetch(`${edge.url}/v1/classify?models=${DATASET},${SECOND}&top_k=1`, {
    method: "POST",
    headers: { ...auth, "content-type": img.file.endsWith(".jpg") ? "image/jpeg" : "image/png" },
    body: img.bytes as BodyInit,
  });
  const body = (await res.json()) as { results?: { model: string; predictions?: { label: string; score: number }[] }[]; error?: { message: string } };
  if (!res.ok) throw new EdgetuneError("multi_classify_failed", `Classifying with both models failed: ${body.error?.message ?? res.status}`);
  const answers = (body.results ?? []).map(
    (r) => `${r.model}: ${r.predictions?.[0]?.label ?? "-"} ${r.predictions?.[0] ? percent(r.predictions[0].score) : ""}`,
  );
  const health = (await (await fetch(`${edge.url}/healthz`, { headers: auth })).json()) as { bases: { heads: number; size: number }[] };
  const bases = health.bases.map((b) => `${b.heads} heads on one ${b.size} px base`).join(", ");
  process.stdout.write(`\n${img.file} with both models in one request: ${answers.join("; ")} (the worker holds ${bases})\n`);
}
