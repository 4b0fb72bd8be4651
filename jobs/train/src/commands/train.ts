/** `edgetune train` and `edgetune embed`: the training job's own commands (local, tests, AWS Batch). */
import { type Command, Option } from "commander";
import { IMAGE_SIZES, STRATEGIES } from "#shared/contracts/common.ts";
import { EdgetuneError, userMessage } from "#shared/errors.ts";
import { listDatasets } from "../catalog/catalog.ts";
import { DEFAULT_OPTIONS, mergeConfig, readConfigFile, type TrainInput } from "../config.ts";
import { createLogger } from "../log.ts";
import { AUTO_DESCRIPTION, KNOWN_BASES } from "../model/bases.ts";
import { batchSubmitter, dispatchNightly } from "../nightly.ts";
import { emit, percent } from "../output.ts";
import { isCapturesKey, runRequests } from "../requests/command.ts";
import { processTraffic } from "../traffic/traffic.ts";
import { clean, datasetRef, type Globals, int, num, storeFrom } from "./options.ts";

export function addTrainCommands(program: Command): void {
  program
    .command("train")
    .description("Train a classifier on a dataset, evaluate it, export it and promote it if it is not worse than the current one.")
    .requiredOption(
      "--dataset <name|s3-url|key|*>",
      "dataset name, s3://bucket/datasets/<name>/, datasets/<name>/manifest.json, or * for every complete dataset",
    )
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
    .option(
      "--novelty-reject <share>",
      `share of the labels' held-out images the novelty rule may answer "none of these" (its features unlike every label's training images); 0 turns it off (default ${DEFAULT_OPTIONS.noveltyReject})`,
      num("novelty-reject"),
    )
    .option("--force", "train even if this dataset + config was already trained")
    .option("--take-over", "train into a model another dataset created: it then belongs to this dataset (its labels may change too)")
    .option("--relabel", "change the label set of this dataset's model (its clients get the new labels)")
    .option("--config <file>", "JSON file with the same options (flags win)")
    .option("--json", "JSON log lines even on a terminal, and the result as JSON")
    .action(async (o: Record<string, string | number | boolean | undefined>, cmd: Command) => {
      const globals = cmd.optsWithGlobals<Globals>();
      const fromFile = o.config ? await readConfigFile(String(o.config)) : {};
      const input: TrainInput = mergeConfig(fromFile, {
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
        noveltyReject: o.noveltyReject as number | undefined,
        force: o.force === true ? true : undefined,
        takeOver: o.takeOver === true ? true : undefined,
        relabel: o.relabel === true ? true : undefined,
        head: {
          epochs: o.epochs as number | undefined,
          learningRate: o.learningRate as number | undefined,
          units: o.units as number | undefined,
          dropout: o.dropout as number | undefined,
        },
        fineTune: {
          epochs: o.fineTuneEpochs as number | undefined,
          learningRate: o.fineTuneLearningRate as number | undefined,
          from: o.fineTuneFrom as string | undefined,
        },
      });
      const { train } = await import("../train.ts");
      const { batchFanOut, FanOutHandedOver } = await import("../features/fan-out.ts");
      // Inside AWS Batch the stack names an Embed job definition: large extractions fan out over it.
      const context = { fanOut: batchFanOut() };
      const store = storeFrom(globals);
      const log = createLogger({ json: o.json === true ? true : undefined });
      // The dispatcher job in AWS Batch (EDGETUNE_DISPATCH, nightly.ts): plan, then submit one training
      // job per changed dataset to the CPU or GPU queue. Elsewhere "*" trains every complete dataset here,
      // one after the other.
      const submit = process.env.EDGETUNE_DISPATCH === "1" ? batchSubmitter() : undefined;
      // A console request's key (requests/command.ts): apply that model's waiting requests. Anything
      // else under captures/ is ignored there, never planned as a dataset upload.
      if (isCapturesKey(input.dataset)) return runRequests(store, clean(input), log, { json: o.json === true, submit });
      if (submit) {
        const { initBackend } = await import("../model/backend.ts");
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
        const globals = cmd.optsWithGlobals<Globals>();
        const shard = o.shard ?? Number(process.env.AWS_BATCH_JOB_ARRAY_INDEX ?? Number.NaN);
        const { embedShard } = await import("../features/shard.ts");
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
}
