#!/usr/bin/env node
/**
 * `edgetune`: the one command line for training and for managing datasets and models. The local
 * stack, the tests and the AWS Batch container all run training through `edgetune train`.
 * S3 comes from the environment (EDGETUNE_BUCKET, AWS_REGION, EDGETUNE_S3_ENDPOINT, AWS_*), or
 * --bucket / --endpoint.
 */
import { readFile, writeFile } from "node:fs/promises";
import { Command, InvalidArgumentError, Option } from "commander";
import type { Answer } from "../../shared/answer.ts";
import { listVersions as listModelVersions } from "../../shared/catalog.ts";
import { DEFAULT_POINTER_TTL_SECONDS, type ModelPointer } from "../../shared/contracts/artifact.ts";
import { IMAGE_SIZES, nameSchema, STRATEGIES } from "../../shared/contracts/common.ts";
import { EdgetuneError, InvalidOptionError, NotFoundError, userMessage } from "../../shared/errors.ts";
import { datasetNameFromManifestKey, keys } from "../../shared/keys.ts";
import { NORMALIZATIONS, type Normalization } from "../../shared/preprocess.ts";
import { S3ObjectStore } from "../../shared/s3/client.ts";
import { s3ConfigFromEnv } from "../../shared/s3/config.ts";
import { answerText } from "./src/answer-text.ts";
import { contentTypeOf, listDatasets, listModels, listVersions, pushDataset, rollback } from "./src/catalog/catalog.ts";
import { DEFAULT_OPTIONS, readConfigFile, type TrainInput } from "./src/config.ts";
import { addExportCommand } from "./src/export/command.ts";
import { createLogger } from "./src/log.ts";
import { AUTO_BASE, AUTO_DESCRIPTION, importBase, KNOWN_BASES, type ModelSource } from "./src/model/bases.ts";
import { batchSubmitter, dispatchNightly } from "./src/nightly.ts";
import { emit, emitList, percent, say } from "./src/output.ts";
import { isRequestKey, runRequests } from "./src/requests/command.ts";
import { followRun, listRunStatuses, type RunStatus, StatusRecorder } from "./src/status.ts";
import { operatorKeysFromEnv, saveCaptureImages } from "./src/traffic/review.ts";
import { applyDecisions, listCaptures, monitor, parseRate, processTraffic, readCaptureConfig, reviewNow, writeCaptureConfig } from "./src/traffic/traffic.ts";

const int = (name: string) => (v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n)) throw new InvalidArgumentError(`${name} must be a whole number`);
  return n;
};
const num = (name: string) => (v: string) => {
  const n = Number(v);
  if (!Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number`);
  return n;
};

function storeFrom(opts: { bucket?: string; endpoint?: string }): S3ObjectStore {
  const overrides: Record<string, unknown> = {};
  if (opts.bucket) overrides.bucket = opts.bucket;
  if (opts.endpoint) Object.assign(overrides, { endpoint: opts.endpoint, forcePathStyle: true });
  return new S3ObjectStore(s3ConfigFromEnv(process.env, overrides));
}

/**
 * `name`; `s3://bucket/datasets/name/` (which also sets the bucket); `datasets/name/manifest.json`
 * (the key an S3 trigger passes); or `*` for every complete dataset (the nightly schedule).
 */
function datasetRef(value: string, opts: { bucket?: string }): string {
  const url = /^s3:\/\/([^/]+)\/datasets\/([^/]+)\/?$/.exec(value);
  if (url) {
    opts.bucket = url[1];
    return url[2] as string;
  }
  if (value.startsWith("s3://"))
    throw new InvalidOptionError("--dataset", value, ["a name", "s3://<bucket>/datasets/<name>/", "datasets/<name>/manifest.json"]);
  return datasetNameFromManifestKey(value) ?? value;
}

const program = new Command("edgetune")
  .description("Transfer learning for image classifiers: S3 dataset in, tfjs model out, served at the edge.")
  .option("--bucket <name>", "S3 bucket (default: $EDGETUNE_BUCKET)")
  .option("--endpoint <url>", "S3 endpoint for S3-compatible servers (default: $EDGETUNE_S3_ENDPOINT)")
  .showHelpAfterError("(run with --help for usage)");

program
  .command("train")
  .description("Train a classifier on a dataset, evaluate it, export it and promote it if it is not worse than the current one.")
  .requiredOption("--dataset <name|s3-url|key|*>", "dataset name, s3://bucket/datasets/<name>/, datasets/<name>/manifest.json, or * for every complete dataset")
  .option("--model <name>", "model to write (default: the dataset name)")
  .option(
    "--base <id>",
    `base model: auto (${AUTO_DESCRIPTION}), best (each candidate scored by cross-validation on this dataset), ${KNOWN_BASES.map((b) => b.id).join(", ")} or an imported id (default ${DEFAULT_OPTIONS.base})`,
  )
  .addOption(
    new Option("--strategy <strategy>", "head: frozen base + new dense head; finetune: then retrain the top blocks at a small learning rate").choices(
      STRATEGIES,
    ),
  )
  .addOption(
    new Option("--image-size <px>", `input size (default ${DEFAULT_OPTIONS.imageSize}, or the manifest's imageSize)`)
      .choices(IMAGE_SIZES.map(String))
      .argParser(Number),
  )
  .option("--epochs <n>", `most head epochs; stops earlier when validation loss stops improving (default ${DEFAULT_OPTIONS.head.epochs})`, int("epochs"))
  .option("--fine-tune-epochs <n>", `fine-tuning epochs (default ${DEFAULT_OPTIONS.fineTune.epochs})`, int("fine-tune-epochs"))
  .option("--fine-tune-from <layer>", "layer whose output is cached; everything above it is retrained (default: the base's)")
  .option("--learning-rate <lr>", `head learning rate (default ${DEFAULT_OPTIONS.head.learningRate})`, num("learning-rate"))
  .option("--fine-tune-learning-rate <lr>", `fine-tuning learning rate (default ${DEFAULT_OPTIONS.fineTune.learningRate})`, num("fine-tune-learning-rate"))
  .option("--units <n>", `hidden units in the head, 0 for none (default ${DEFAULT_OPTIONS.head.units})`, int("units"))
  .option("--dropout <rate>", `head dropout (default ${DEFAULT_OPTIONS.head.dropout})`, num("dropout"))
  .option("--views <n>", `augmented views per training image, 1 for none (default ${DEFAULT_OPTIONS.views})`, int("views"))
  .option("--seed <n>", `seed for splits, initialisation and augmentation (default ${DEFAULT_OPTIONS.seed})`, int("seed"))
  .addOption(
    new Option(
      "--weights <dtype>",
      "exported weight type of the base (the head stays float32; the base is computed with float16-rounded weights in training, so float32 adds size, not accuracy); uint8 falls back to float16 if it changes a held-out prediction",
    ).choices(["float16", "uint8", "float32"]),
  )
  .option(
    "--promotion-tolerance <fraction>",
    `promote if accuracy >= current - tolerance (default ${DEFAULT_OPTIONS.promotionTolerance})`,
    num("promotion-tolerance"),
  )
  .option(
    "--min-held-out-per-label <n>",
    `promote only with at least this many evaluated held-out images per label (default ${DEFAULT_OPTIONS.minHeldOutPerLabel})`,
    int("min-held-out-per-label"),
  )
  .addOption(
    new Option(
      "--promote <when>",
      "if-better: only when the promotion rules hold; always: without checking them; never: keep for review (default if-better)",
    ).choices(["if-better", "always", "never"]),
  )
  .option(
    "--threshold-policy <policy>",
    "per-label score thresholds below which an answer is unsure: f1 (each label's best F1 on held-out images) or precision:<target>, e.g. precision:0.95 (default f1)",
  )
  .option("--force", "train even if this dataset + config was already trained")
  .option("--take-over", "train into a model another dataset created: it then belongs to this dataset (its labels may change too)")
  .option("--relabel", "change the label set of this dataset's model (its clients get the new labels)")
  .option("--config <file>", "JSON file with the same options (flags win)")
  .option("--json", "JSON log lines even on a terminal, and the result as JSON")
  .action(async (o: Record<string, string | number | boolean | undefined>, cmd: Command) => {
    const globals = cmd.optsWithGlobals() as { bucket?: string; endpoint?: string };
    const fromFile = o.config ? await readConfigFile(String(o.config)) : {};
    const input: TrainInput = {
      ...fromFile,
      dataset: datasetRef(String(o.dataset), globals),
      model: o.model as string | undefined,
      base: o.base as string | undefined,
      strategy: o.strategy as TrainInput["strategy"],
      imageSize: o.imageSize as TrainInput["imageSize"],
      seed: o.seed as number | undefined,
      views: o.views as number | undefined,
      weights: o.weights as TrainInput["weights"],
      promotionTolerance: o.promotionTolerance as number | undefined,
      minHeldOutPerLabel: o.minHeldOutPerLabel as number | undefined,
      promote: o.promote as TrainInput["promote"],
      thresholdPolicy: o.thresholdPolicy as string | undefined,
      force: o.force === true ? true : undefined,
      takeOver: o.takeOver === true ? true : undefined,
      relabel: o.relabel === true ? true : undefined,
      head: {
        ...fromFile.head,
        epochs: o.epochs as number | undefined,
        learningRate: o.learningRate as number | undefined,
        units: o.units as number | undefined,
        dropout: o.dropout as number | undefined,
      },
      fineTune: {
        ...fromFile.fineTune,
        epochs: o.fineTuneEpochs as number | undefined,
        learningRate: o.fineTuneLearningRate as number | undefined,
        from: o.fineTuneFrom as string | undefined,
      },
    };
    const { train } = await import("./src/train.ts");
    const { batchFanOut, FanOutHandedOver } = await import("./src/features/fan-out.ts");
    // Inside AWS Batch the stack names an Embed job definition: large extractions fan out over it.
    const context = { fanOut: batchFanOut() };
    const store = storeFrom(globals);
    const log = createLogger({ json: o.json === true ? true : undefined });
    // The dispatcher job in AWS Batch (EDGETUNE_DISPATCH, nightly.ts): plan, then submit one training
    // job per changed dataset to the CPU or GPU queue. Elsewhere "*" trains every complete dataset here,
    // one after the other.
    const submit = process.env.EDGETUNE_DISPATCH === "1" ? batchSubmitter() : undefined;
    // A console request's key (src/requests/command.ts): apply that model's waiting requests.
    if (isRequestKey(input.dataset)) return runRequests(store, clean(input), log, { json: o.json === true, submit });
    if (submit) {
      const { initBackend } = await import("./src/model/backend.ts");
      await initBackend(); // a base not yet in the bucket is imported while planning
      const { dataset, ...options } = input;
      const r = await dispatchNightly(store, clean(options), submit, log, dataset === "*" ? "*" : [dataset]);
      emit({ json: o.json === true }, r, JSON.stringify(r, null, 2));
      if (r.failed.length > 0)
        throw new EdgetuneError(
          "some_failed",
          `${r.failed.length} dataset(s) could not be planned: ${r.failed.map((f) => f.dataset).join(", ")} (see the log above).`,
        );
      return;
    }
    if (input.dataset === "*") await processTraffic(store, log).catch((e) => log.warn(`traffic not processed: ${userMessage(e)}`));
    const names = input.dataset === "*" ? (await listDatasets(store)).filter((d) => d.complete).map((d) => d.name) : [input.dataset];
    let failed = 0;
    for (const dataset of names) {
      try {
        const result = await train(store, clean({ ...input, dataset }), log, context);
        const { status, name: model, version, promoted, accuracy, reason } = result;
        emit(
          { json: o.json === true },
          { status, model, version, promoted, accuracy, reason },
          status === "exists"
            ? `${model} ${version}: ${reason}.`
            : `${model} ${version} ${promoted ? "promoted" : "kept back"} (${percent(accuracy)}): ${reason}. Report: edgetune report ${model} ${version}`,
        );
      } catch (e) {
        if (e instanceof FanOutHandedOver) {
          // This job's work goes on in its continuation, after the array children: it ends here, successfully.
          log.info(e.message);
          emit(
            { json: o.json === true },
            { status: "handed-over", dataset, arrayJobId: e.arrayJobId, continuationJobId: e.continuationJobId },
            `${dataset}: feature extraction handed over to array job ${e.arrayJobId}; training goes on in job ${e.continuationJobId}.`,
          );
          continue;
        }
        // One bad dataset must not stop the nightly run of the others; it still fails the job.
        if (names.length === 1) throw e;
        failed++;
        log.warn(`training ${dataset} failed: ${userMessage(e)}`);
      }
    }
    if (failed > 0) throw new EdgetuneError("some_failed", `${failed} of ${names.length} datasets failed to train (see the log above).`);
  });

program
  .command("embed")
  .description("Compute the frozen features of one shard of a dataset (an AWS Batch array job child); train then finds them cached.")
  .requiredOption("--dataset <name|s3-url|key>", "dataset name, s3://bucket/datasets/<name>/ or datasets/<name>/manifest.json")
  .option("--shard <i>", "this child's index (default: $AWS_BATCH_JOB_ARRAY_INDEX)", int("shard"))
  .requiredOption("--shards <n>", "number of children", int("shards"))
  .option("--base <id>", "base model (as for train)")
  .addOption(new Option("--image-size <px>", "input size (as for train)").choices(IMAGE_SIZES.map(String)).argParser(Number))
  .option("--views <n>", "augmented views per training image (as for train)", int("views"))
  .option("--seed <n>", "seed (as for train)", int("seed"))
  .option("--json", "JSON log lines even on a terminal")
  .action(
    async (
      o: { dataset: string; shard?: number; shards: number; base?: string; imageSize?: 96; views?: number; seed?: number; json?: boolean },
      cmd: Command,
    ) => {
      const globals = cmd.optsWithGlobals() as { bucket?: string; endpoint?: string };
      const shard = o.shard ?? Number(process.env.AWS_BATCH_JOB_ARRAY_INDEX ?? Number.NaN);
      const { embedShard } = await import("./src/features/shard.ts");
      const log = createLogger({ json: o.json === true ? true : undefined });
      // A child of a training run's fan-out ends successfully even when its shard failed: the run's
      // continuation waits for every child and computes what is missing; a failed child would fail it.
      const child = process.env.EDGETUNE_FAN_OUT_PARENT !== undefined;
      const stats = await embedShard(
        storeFrom(globals),
        clean({ dataset: datasetRef(o.dataset, globals), base: o.base, imageSize: o.imageSize, views: o.views, seed: o.seed }),
        shard,
        o.shards,
        log,
      ).catch((e: unknown) => {
        if (!child) throw e;
        log.warn(`shard ${shard} could not be embedded (${userMessage(e)}); the training run will compute it`);
        return { shard, failed: true };
      });
      emit({ json: o.json === true }, stats, JSON.stringify(stats));
    },
  );

const base = program.command("base").description("Pretrained bases");
base
  .command("import <source>")
  .description("Store a Keras-style tfjs LayersModel (URL of model.json, local folder, or s3://bucket/prefix/) as a base, cut at its feature layer.")
  .requiredOption("--id <id>", "id to store it under (bases/<id>/)")
  .requiredOption("--feature-layer <layer>", "layer whose output feeds the head (e.g. out_relu)")
  .addOption(new Option("--normalization <n>", "input scaling the weights expect").choices(Object.keys(NORMALIZATIONS)).makeOptionMandatory())
  .option("--fine-tune-from <layer>", "default cut for fine-tuning")
  .option("--licence <text>", "licence of the weights")
  .option("--json", "the stored base as JSON")
  .action(
    async (
      source: string,
      o: { id: string; featureLayer: string; normalization: Normalization; fineTuneFrom?: string; licence?: string; json?: boolean },
      cmd: Command,
    ) => {
      const store = storeFrom(cmd.optsWithGlobals());
      const { initBackend } = await import("./src/model/backend.ts");
      await initBackend();
      const src: ModelSource = /^https?:\/\//.test(source)
        ? { kind: "url", url: source }
        : source.startsWith("s3://")
          ? { kind: "s3", store, key: source.replace(/^s3:\/\/[^/]+\//, "") }
          : { kind: "dir", path: source };
      const meta = await importBase(store, src, {
        id: o.id,
        featureLayer: o.featureLayer,
        normalization: o.normalization,
        fineTuneFrom: o.fineTuneFrom,
        licence: o.licence,
      });
      const bytes = meta.files.reduce((n, f) => n + f.bytes, 0);
      emit(
        o,
        { id: meta.id, sha256: meta.sha256, featureLayer: meta.featureLayer, bytes },
        `Base ${meta.id} stored (${(bytes / 1e6).toFixed(1)} MB, features from ${meta.featureLayer}); train with --base ${meta.id}.`,
      );
    },
  );
base
  .command("list")
  .description("Bases edgetune knows by name")
  .option("--json", "one JSON object per base")
  .action((o: { json?: boolean }) => {
    const bases = [
      { id: AUTO_BASE, description: `The default: ${AUTO_DESCRIPTION}.`, default: DEFAULT_OPTIONS.base === AUTO_BASE },
      ...KNOWN_BASES.map((b) => ({ id: b.id, description: b.description, default: b.id === DEFAULT_OPTIONS.base })),
    ];
    emitList(o, bases, "", ["BASE", "DESCRIPTION"], (b) => [b.id + (b.default ? " (default)" : ""), b.description]);
  });

program
  .command("push <folder>")
  .description("Upload a folder (one sub-folder per label, or train/ and val/ splits) as a dataset; the manifest is written last and triggers training.")
  .requiredOption("--dataset <name>", "dataset name")
  .addOption(new Option("--strategy <strategy>").choices(STRATEGIES))
  .option("--base <id>", "base model for this dataset")
  .option("--wait", "follow the training run this push triggers to its end; exit 0 if its version is served, 2 if kept back, 1 if it failed")
  .option("--dry-run", "check the folder with the training job's rules (and decode a sample) without uploading")
  .option("--drop-captured", "also remove accepted captures (captured-*) from the dataset; by default a push keeps them")
  .option("--json", "the result (and with --wait the run's states) as JSON lines")
  .action(
    async (
      folder: string,
      o: { dataset: string; strategy?: "head" | "finetune"; base?: string; wait?: boolean; dryRun?: boolean; dropCaptured?: boolean; json?: boolean },
      cmd: Command,
    ) => {
      const log = createLogger();
      const store = storeFrom(cmd.optsWithGlobals());
      const since = new Date().toISOString();
      const r = await pushDataset(store, folder, o.dataset, { strategy: o.strategy, base: o.base }, (d, t) => log.progress("upload", d, t), {
        dryRun: o.dryRun,
        dropCaptured: o.dropCaptured,
        // The queued record exists before the trigger does: a run that starts at once still finds it.
        beforeManifest: () => new StatusRecorder(store, o.dataset, "queued").update({}, true),
      });
      for (const w of r.warnings) say(`warning: ${w}`);
      // The dataset becomes what the folder holds: say what that takes away.
      const gone = r.removed.length > 10 ? `${r.removed.slice(0, 10).join(", ")} and ${r.removed.length - 10} more` : r.removed.join(", ");
      if (r.removed.length > 0) say(`${o.dryRun ? "would remove" : "removed"} ${r.removed.length} file(s) of ${o.dataset} the folder no longer has: ${gone}`);
      const labels = Object.entries(r.labels)
        .map(([l, n]) => `${l} ${n}`)
        .join(", ");
      if (o.dryRun) {
        emit(
          o,
          { dataset: o.dataset, labels: r.labels, notImages: r.skipped.length, warnings: r.warnings, removed: r.removed },
          `${o.dataset}: ${labels} — ready to push (nothing was uploaded).`,
        );
        return;
      }
      emit(
        o,
        { dataset: o.dataset, uploaded: r.uploaded, removed: r.removed, notImages: r.skipped.length, state: "queued" },
        `Uploaded ${r.uploaded} images of ${o.dataset} (${labels}); training is triggered (the manifest was written last).${o.wait ? "" : ` Follow it: edgetune status ${o.dataset} --follow`}`,
      );
      if (!o.wait) return;
      const final = await followRun(store, o.dataset, since, (s) => emit(o, s, describeRun(s)));
      if (!final) throw new EdgetuneError("wait_timeout", `No run of ${o.dataset} finished within 6 hours; see edgetune status ${o.dataset}.`);
      process.exitCode = exitCodeOf(final);
    },
  );

program
  .command("status [dataset]")
  .description("Recent training runs (of one dataset, or of all): queued, running with its phase, done (promoted or not, and why) or failed")
  .option("--follow", "follow the newest run of the dataset until it ends; exit 0 if promoted, 2 if kept back, 1 if it failed")
  .option("--json", "one JSON object per run")
  .action(async (dataset: string | undefined, o: { follow?: boolean; json?: boolean }, cmd: Command) => {
    const store = storeFrom(cmd.optsWithGlobals());
    if (dataset !== undefined && !nameSchema.safeParse(dataset).success)
      throw new InvalidOptionError("dataset name", dataset, ["a name of 1–63 characters a-z, 0-9, '.', '_', '-'"]);
    const runs = await listRunStatuses(store, dataset);
    if (!o.follow) {
      if (runs.length === 0) say(dataset ? `No runs of ${dataset} yet (runs are kept 30 days).` : "No runs yet.");
      for (const s of runs) emit(o, s, describeRun(s));
      return;
    }
    if (!dataset) throw new EdgetuneError("invalid_option", "--follow needs a dataset: edgetune status <dataset> --follow");
    const newest = runs[0];
    if (!newest) throw new EdgetuneError("not_found", `No runs of ${dataset} yet; push it, or wait for the trigger.`);
    const final = await followRun(store, dataset, newest.startedAt, (s) => emit(o, s, describeRun(s)));
    if (final) process.exitCode = exitCodeOf(final);
  });

program
  .command("datasets")
  .description("List datasets with their last training run")
  .option("--json", "one JSON object per dataset")
  .action(async (o: { json?: boolean }, cmd: Command) => {
    const store = storeFrom(cmd.optsWithGlobals());
    const rows = [];
    for (const d of await listDatasets(store)) rows.push({ ...d, lastRun: (await listRunStatuses(store, d.name, 1))[0] ?? null });
    emitList(o, rows, "No datasets yet: edgetune push <folder> --dataset <name>.", ["DATASET", "FILES", "STATE", "LAST RUN"], (d) => [
      d.name,
      String(d.files),
      d.complete ? "complete" : "uploading (no manifest)",
      d.lastRun ? runOutcome(d.lastRun) : "—",
    ]);
  });

program
  .command("capture <model>")
  .description("Show or change what the edge stores of a model's traffic for review (off until turned on; README: Learning from traffic)")
  .option("--on", "turn capture on")
  .option("--off", "turn capture off (nothing more is stored; what was stored expires)")
  .option("--below <score>", "store inputs whose top score is below this (0–1)")
  .option("--sample <rate>", "and this share of the other inputs (0–1 or a percentage)")
  .option("--max-per-day <n>", "at most this many inputs a day, all edge isolates together", int("--max-per-day"))
  .option("--max-mb-per-day <n>", "at most this many MB a day", int("--max-mb-per-day"))
  .option("--json", "the settings as JSON")
  .action(
    async (
      model: string,
      o: { on?: boolean; off?: boolean; below?: string; sample?: string; maxPerDay?: number; maxMbPerDay?: number; json?: boolean },
      cmd: Command,
    ) => {
      const store = storeFrom(cmd.optsWithGlobals());
      const changes = {
        ...(o.on ? { enabled: true } : {}),
        ...(o.off ? { enabled: false } : {}),
        ...(o.below !== undefined ? { belowConfidence: parseRate(o.below, "--below") } : {}),
        ...(o.sample !== undefined ? { sampleRate: parseRate(o.sample, "--sample") } : {}),
        ...(o.maxPerDay !== undefined ? { maxPerDay: o.maxPerDay } : {}),
        ...(o.maxMbPerDay !== undefined ? { maxBytesPerDay: o.maxMbPerDay * 1024 * 1024 } : {}),
      };
      const config = Object.keys(changes).length > 0 ? await writeCaptureConfig(store, model, changes) : await readCaptureConfig(store, model);
      emit(
        o,
        { model, ...config },
        config.enabled
          ? `Capture of ${model} is on: inputs scored below ${config.belowConfidence} and ${percent(config.sampleRate)} of the others, at most ${config.maxPerDay} a day (${Math.round(config.maxBytesPerDay / 1048576)} MB), kept ${config.maxSide} px at most. Review: edgetune review ${model}.`
          : `Capture of ${model} is off. Turn it on: edgetune capture ${model} --on.`,
      );
    },
  );

program
  .command("review <model>")
  .description("The inputs the edge captured for review; accept (into the dataset, under the predicted or a corrected label) or discard them")
  .option("--accept <ids>", "comma-separated capture ids (or <id>@<sha256> from --save) to add to the dataset")
  .option("--as <label>", "with --accept: the true label (default: the predicted one)")
  .option("--discard <ids>", "comma-separated capture ids to drop")
  .option("--save <dir>", "save the images waiting for review into <dir>, named <id>@<sha256>; --accept <id>@<sha256> then adds exactly those bytes")
  .option("--unseen", "with --accept <id> (no @<sha256>): add the image stored now, without having looked at it")
  .option("--json", "one JSON object per capture, or the applied decisions")
  .action(async (model: string, o: { accept?: string; as?: string; discard?: string; save?: string; unseen?: boolean; json?: boolean }, cmd: Command) => {
    const store = storeFrom(cmd.optsWithGlobals());
    const ids = (list?: string) =>
      (list ?? "")
        .split(",")
        .map((x) => x.trim())
        .filter(Boolean);
    // Thrown inside an action, so an EdgetuneError: commander's own errors are only understood while parsing.
    if (o.as && !o.accept) throw new EdgetuneError("invalid_option", "--as goes with --accept: edgetune review <model> --accept <ids> --as <label>.");
    if (o.save) {
      const saved = await saveCaptureImages(store, model, o.save);
      emitList(o, saved, `Nothing of ${model} is waiting for review.`, ["ID", "FILE"], (f) => [f.id, f.file]);
      return;
    }
    if (!o.accept && !o.discard) {
      const pending = await listCaptures(store, model);
      emitList(
        o,
        pending,
        `Nothing of ${model} is waiting for review${(await readCaptureConfig(store, model)).enabled ? "" : ` (capture is off: edgetune capture ${model} --on)`}.`,
        ["ID", "CAPTURED", "VERSION", "PREDICTED", "SCORE", "WHY", "DECIDED"],
        (c) => [
          c.id,
          c.capturedAt.replace("T", " ").slice(0, 19),
          c.version,
          c.predictions[0]?.label ?? "",
          percent(c.predictions[0]?.score),
          c.reason === "low_confidence" ? "unsure" : "sampled",
          c.decision ? `${c.decision.action}${c.decision.label ? ` as ${c.decision.label}` : ""} (${c.decision.by})` : "",
        ],
      );
      return;
    }
    // Made here, bound to the bytes shown, applied from memory (traffic/review.ts). Console decisions are
    // applied by the nightly run, or here too when EDGETUNE_CONSOLE_KEYS lets their signatures be checked.
    const log = createLogger();
    const r = await reviewNow(store, model, { accept: ids(o.accept), discard: ids(o.discard), as: o.as, unseen: o.unseen }, log);
    if (operatorKeysFromEnv().length > 0) {
      const signed = await applyDecisions(store, model, log);
      r.accepted.push(...signed.accepted);
      r.discarded.push(...signed.discarded);
      r.refused.push(...signed.refused);
    }
    // Each label said: without --as it came from the capture's record, which the edge may rewrite.
    if (!o.json) for (const a of r.accepted) say(`added: ${a.id} as ${a.key.split("/").at(-2)} (${a.key})`);
    for (const f of r.refused) say(`not added: ${f.id}: ${f.reason}`);
    // The dataset the images joined (the model's own), named so the suggested command runs as printed.
    const dataset = r.accepted[0]?.key.split("/")[1];
    emit(
      o,
      r,
      `${r.accepted.length} added to the dataset, ${r.discarded.length} discarded${r.refused.length ? `, ${r.refused.length} refused` : ""}.${dataset ? ` The next nightly run trains on the added images (or now: edgetune train --dataset ${dataset}).` : ""}`,
    );
    if (r.refused.length > 0) process.exitCode = 1;
  });

program
  .command("monitor <model>")
  .description("The served model's traffic per day (answers, low-confidence share, predicted labels) against its held-out split, with drift flags")
  .option("--days <n>", "how many days back", int("--days"), 7)
  .option("--json", "the summary as JSON")
  .action(async (model: string, o: { days: number; json?: boolean }, cmd: Command) => {
    const store = storeFrom(cmd.optsWithGlobals());
    const s = await monitor(store, model, { days: o.days });
    if (o.json) {
      emit(o, s, "");
      return;
    }
    const ref = s.reference;
    const share = (labels: Record<string, number>, total: number) =>
      Object.entries(labels)
        .sort((a, b) => b[1] - a[1])
        .slice(0, 3)
        .map(([l, n]) => `${l} ${Math.round((100 * n) / Math.max(1, total))}%`)
        .join(", ");
    emitList(
      o,
      s.days,
      `No traffic of ${model} counted in the last ${o.days} days (edge isolates flush their counters every minute or so).`,
      ["DAY", "ANSWERS", `UNDER ${s.threshold}`, "TOP PREDICTED", "CAPTURED", "DRIFT"],
      (d) => [
        d.day,
        String(d.requests),
        percent(d.lowConfidence / Math.max(1, d.requests)),
        share(d.labels, d.requests),
        String(d.captured),
        d.drift.join("; ") || "—",
      ],
    );
    if (ref) {
      emit(
        o,
        null,
        `Held-out split of ${ref.version} (${ref.evaluatedOn} images): ${heldOutUnder(ref, s.threshold)}; predicted ${share(Object.fromEntries(Object.entries(ref.labels).map(([l, v]) => [l, v * 100])), 100)}.`,
      );
    }
  });

program
  .command("models [name]")
  .description("List models, or the versions of one model with their metrics (* marks the served one)")
  .option("--json", "one JSON object per model or version")
  .action(async (name: string | undefined, o: { json?: boolean }, cmd: Command) => {
    const store = storeFrom(cmd.optsWithGlobals());
    if (!name) {
      const models = await Promise.all(
        (await listModels(store)).map(async (m) => {
          // The shared reader, which does not throw for a model folder left half-written.
          const { pointer, versions } = await listModelVersions(store, m);
          return { name: m, current: pointer?.version ?? null, promotedAt: pointer?.promotedAt ?? null, versions: versions.length };
        }),
      );
      emitList(o, models, "No models yet: push a dataset (edgetune push <folder> --dataset <name>).", ["MODEL", "SERVED", "PROMOTED", "VERSIONS"], (m) => [
        m.name,
        m.current ?? "none",
        m.promotedAt?.replace("T", " ").slice(0, 19) ?? "—",
        String(m.versions),
      ]);
      return;
    }
    const { versions } = await listVersions(store, name);
    emitList(
      o,
      versions,
      `Model ${name} has no version with metadata yet.`,
      ["", "VERSION", "TRAINED", "ACCURACY", "HELD-OUT", "STRATEGY", "BASE", "IMAGES"],
      (v) => [
        v.current ? "*" : "",
        v.version,
        v.createdAt.replace("T", " ").slice(0, 19),
        percent(v.accuracy),
        String(v.evaluatedOn),
        v.strategy,
        v.base,
        String(v.images),
      ],
    );
  });

program
  .command("current <name>")
  .description("Show the promoted version of a model")
  .option("--json", "the pointer (current.json) as JSON")
  .action(async (name: string, o: { json?: boolean }, cmd: Command) => {
    const { pointer } = await listVersions(storeFrom(cmd.optsWithGlobals()), name);
    if (!pointer) throw new NotFoundError(`Model ${name} has versions but none is promoted; promote one with edgetune rollback ${name} --to <version>.`);
    emit(o, pointer, describePointer(name, pointer));
  });

program
  .command("rollback <name>")
  .description("Point the model at an earlier version (default: the one before the current)")
  .option("--to <version>", "version to serve")
  .option("--json", "the new pointer (current.json) as JSON")
  .action(async (name: string, o: { to?: string; json?: boolean }, cmd: Command) => {
    const { pointer: p, changed, duringRun } = await rollback(storeFrom(cmd.optsWithGlobals()), name, o.to);
    emit(
      o,
      { ...p, changed },
      changed
        ? `${name} now serves ${p.version} (was ${p.previous}); the edge picks it up within ${DEFAULT_POINTER_TTL_SECONDS} seconds (the worker's POINTER_TTL_SECONDS).`
        : `${name} already serves ${p.version}; nothing changed.`,
    );
    if (changed && duringRun) say(`A training run of ${name} is in progress: it will not undo this rollback (it ends not promoted).`);
  });

/** How many held-out answers scored under the threshold, as the count it is (a share of 6 images is not "90.0 %"). */
function heldOutUnder(ref: { evaluatedOn: number; lowConfidence: number | null }, threshold: number): string {
  if (ref.lowConfidence === null) return `answers under ${threshold} not known exactly for this version (trained before per-image scores were kept)`;
  return `${Math.round(ref.lowConfidence * ref.evaluatedOn)} of ${ref.evaluatedOn} answers under ${threshold}`;
}

/** The served version of a model, for people. */
function describePointer(name: string, p: ModelPointer): string {
  const back = p.history?.[0] ? `; edgetune rollback ${name} would serve ${p.history[0]}` : "";
  return `${name} serves ${p.version} since ${p.promotedAt.replace("T", " ").slice(0, 19)} UTC (${p.reason})${back}`;
}

/** One line a person can read: when, which dataset, what state, and why. */
function describeRun(s: RunStatus): string {
  return `${s.startedAt.replace("T", " ").slice(0, 19)}  ${s.dataset.padEnd(20)} ${runOutcome(s)}`;
}

/** What state a run is in, and why. */
function runOutcome(s: RunStatus): string {
  return s.state === "running"
    ? `running: ${s.phase ?? "starting"}${s.progress ? ` ${s.progress.done}/${s.progress.total}` : ""}`
    : s.state === "done" && s.unchanged
      ? `already trained: ${s.model ?? ""} ${s.version ?? ""} (${s.promoted ? "served" : "not served"})`
      : s.state === "done"
        ? `${s.promoted ? "promoted" : "not promoted"} ${s.model ?? ""} ${s.version ?? ""}${s.accuracy !== undefined ? ` (${(s.accuracy * 100).toFixed(1)} %)` : ""}: ${s.reason ?? ""}${s.report ? `; report: ${s.report}` : ""}`
        : s.state === "failed"
          ? `failed: ${s.reason ?? "unknown reason"}`
          : "queued";
}

/** 0: the run's version is served (promoted now, or already trained and served); 2: kept back; 1: failed. */
const exitCodeOf = (s: RunStatus) => (s.state === "failed" ? 1 : s.promoted ? 0 : 2);

program
  .command("report <model> [version]")
  .description("Save a version's training report (default: the served one) as HTML and say where it is; --json prints report.json")
  .option("--out <file>", "where to write the HTML (default: ./<model>-<version>-report.html)")
  .option("--json", "print report.json instead")
  .action(async (model: string, version: string | undefined, o: { out?: string; json?: boolean }, cmd: Command) => {
    const store = storeFrom(cmd.optsWithGlobals());
    const { pointer, versions } = await listVersions(store, model);
    const chosen = version ?? pointer?.version ?? versions.at(-1)?.version;
    if (!chosen || !versions.some((v) => v.version === chosen))
      throw new NotFoundError(`Model ${model} has no version ${chosen ?? "yet"}. Versions: ${versions.map((v) => v.version).join(", ") || "none"}.`);
    const key = keys.versionFile(model, chosen, o.json ? "report.json" : "report.html");
    const bytes = await store.get(key);
    if (!bytes) throw new NotFoundError(`Version ${chosen} of ${model} has no report (${key}).`);
    if (o.json) {
      // Stored indented for people who open it in S3; --json is one object a line, like every command.
      emit(o, JSON.parse(new TextDecoder().decode(bytes)), "");
      return;
    }
    const out = o.out ?? `${model}-${chosen}-report.html`;
    await writeFile(out, bytes);
    process.stdout.write(`${out}\n`);
    say(`Report of ${model} ${chosen} (s3://${s3ConfigFromEnv(process.env).bucket}/${key}) saved to ${out}; open it in a browser.`);
  });

program
  .command("classify <model> <images...>")
  .description("Classify image files with the edge worker, as a client would")
  .option("--url <url>", "the worker's URL (default: $EDGETUNE_EDGE_URL)")
  .option("--key <key>", "an API key (default: $EDGETUNE_API_KEY)")
  .option("--top <k>", "labels per image", int("top"), 3)
  .option("--threshold <score>", "one score threshold (0 to 1) for every label instead of the version's per-label ones", num("threshold"))
  .option("--json", "the worker's JSON answer per image")
  .action(async (model: string, images: string[], o: { url?: string; key?: string; top: number; threshold?: number; json?: boolean }) => {
    const url = (o.url ?? process.env.EDGETUNE_EDGE_URL)?.replace(/\/$/, "");
    const key = o.key ?? process.env.EDGETUNE_API_KEY;
    if (!url || !key)
      throw new EdgetuneError("invalid_option", "Say where the worker is and how to get in: --url (or EDGETUNE_EDGE_URL) and --key (or EDGETUNE_API_KEY).");
    let failed = 0;
    for (const file of images) {
      const bytes = await readFile(file).catch(() => {
        throw new NotFoundError(`Cannot read ${file}.`);
      });
      const threshold = o.threshold === undefined ? "" : `&threshold=${o.threshold}`;
      const res = await fetch(`${url}/v1/models/${encodeURIComponent(model)}/classify?top_k=${o.top}${threshold}`, {
        method: "POST",
        headers: { authorization: `Bearer ${key}`, "content-type": contentTypeOf(file) },
        body: bytes,
      }).catch((e: unknown) => {
        throw new EdgetuneError("edge_unreachable", `The worker at ${url} cannot be reached (${e instanceof Error ? e.message : e}).`);
      });
      const body = (await res.json()) as Partial<Answer> & { error?: { message: string } };
      if (!res.ok) failed++;
      emit(
        o,
        { file, status: res.status, ...body },
        `${file}: ${res.ok ? answerText({ ...body, predictions: body.predictions ?? [] }) : `HTTP ${res.status}: ${body.error?.message ?? ""}`}`,
      );
    }
    if (failed > 0) process.exitCode = 1;
  });

addExportCommand(program, storeFrom);

function clean<T>(o: T): T {
  return JSON.parse(JSON.stringify(o)) as T;
}

try {
  await program.parseAsync(process.argv);
} catch (e) {
  say(`edgetune: ${e instanceof InvalidOptionError ? e.message : userMessage(e)}`);
  if (process.env.EDGETUNE_DEBUG) console.error(e);
  process.exitCode = 1;
}
