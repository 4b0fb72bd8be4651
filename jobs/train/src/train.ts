import * as tf from "@tensorflow/tfjs";
import sharp from "sharp";
import { VersionExistsError, writeArtifact, writePointer } from "../../../shared/artifacts.ts";
import type { ArtifactMetadata } from "../../../shared/contracts/artifact.ts";
import type { BaseMetadata } from "../../../shared/contracts/base.ts";
import { DatasetError, EdgetuneError } from "../../../shared/errors.ts";
import { keys } from "../../../shared/keys.ts";
import { PREPROCESSING_VERSIONS, type PreprocessingSpec, preprocess } from "../../../shared/preprocess.ts";
import type { ObjectStore } from "../../../shared/s3/store.ts";
import { initBackend } from "./backend.ts";
import { ensureBase, loadBase } from "./bases.ts";
import { s3Checkpointer } from "./checkpoint.ts";
import { resolveOptions, type TrainInput, type TrainOptions, versionId } from "./config.ts";
import { type Dataset, type DatasetImage, readDataset } from "./dataset.ts";
import { decodeImage } from "./decode.ts";
import { type ExtractorSpec, extractSplits, type Features } from "./embed.ts";
import { evaluate } from "./evaluate.ts";
import { buildClassifier, exportClassifier } from "./export.ts";
import { type EmbedFanOut, fanOutHook } from "./fan-out.ts";
import { buildTop } from "./finetune.ts";
import { applyLayers, concatRows, type EpochLog, headLayers, predictRows, type TrainData, trainModel } from "./head.ts";
import { acquireLock } from "./lock.ts";
import type { Logger } from "./log.ts";
import { WEIGHTS_FILE } from "./model-io.ts";
import { currentHeadWeights, loadCurrent, scoreCurrent } from "./promote.ts";
import { renderReportHtml, type TrainingReport } from "./report.ts";

/**
 * One training run, end to end: dataset listing → cached features → head (→ fine-tuned top) →
 * evaluation → export (verified by reloading) → new immutable version → promotion if not worse.
 * The CLI, the local dispatcher, the tests and the Batch container all call this function.
 */
export interface TrainResult {
  status: "trained" | "exists";
  name: string;
  version: string;
  promoted: boolean;
  reason: string;
  accuracy?: number;
  report?: TrainingReport;
}

const LIBRARIES = { "@tensorflow/tfjs": tf.version.tfjs, edgetune: "0.1.0" };

export interface TrainContext {
  /** Where a large extraction may be spread over other machines (AWS Batch array jobs); none: this machine does it all. */
  fanOut?: EmbedFanOut;
}

export async function train(store: ObjectStore, input: TrainInput, log: Logger, context: TrainContext = {}): Promise<TrainResult> {
  const phases: TrainingReport["phases"] = [];
  const phase = async <T>(name: string, f: () => Promise<T>, detail?: (r: T) => Record<string, unknown>): Promise<T> => {
    const t0 = performance.now();
    const r = await f();
    const seconds = (performance.now() - t0) / 1000;
    phases.push({ name, seconds, detail: detail?.(r) });
    log.info(`${name} done`, { seconds: Number(seconds.toFixed(2)), ...detail?.(r) });
    return r;
  };

  const backend = await initBackend();
  log.info(`backend ${backend.name}`, { reason: backend.reason });
  const preliminary = resolveOptions(input);
  const dataset = await phase(
    "read dataset",
    () => readDataset(store, preliminary.dataset, { seed: preliminary.seed, valFraction: preliminary.valFraction }),
    (d) => ({
      images: d.images.length,
      labels: d.labels.length,
      ignored: d.ignored.length,
    }),
  );
  const options = resolveOptions(input, dataset.manifest);
  const name = options.model ?? options.dataset;
  for (const w of dataset.warnings) log.warn(w);
  const base = await phase(
    "base",
    () => ensureBase(store, options.base),
    (b) => ({ id: b.id }),
  );
  const version = await versionId(options, dataset.fingerprint, base.sha256);
  if (!options.force && (await store.head(keys.metadata(name, version)))) {
    log.info(`version ${version} already exists for this dataset and config; nothing to do`);
    return { status: "exists", name, version, promoted: false, reason: "already trained (same dataset fingerprint and options)" };
  }

  // One run per model at a time; a duplicate trigger waits here, then finds its version written.
  const lock = await acquireLock(store, name);
  try {
    if (!options.force && (await store.head(keys.metadata(name, version)))) {
      log.info(`version ${version} was written by a concurrent run; nothing to do`);
      return { status: "exists", name, version, promoted: false, reason: "written by a concurrent run of the same dataset and config" };
    }
    return await trainLocked();
  } finally {
    await lock.release();
  }

  async function trainLocked(): Promise<TrainResult> {
    const { preprocessing, pooledSpec } = featureSpec(base, options);
    const size = options.imageSize;
    const baseModel = await loadBase(store, base, size);
    const disposables: { dispose(): void }[] = [baseModel];
    try {
      const train = dataset.images.filter((i) => i.split === "train");
      const val = dataset.images.filter((i) => i.split === "val");
      const labelIndex = new Map(dataset.labels.map((l, i) => [l, i]));

      // Frozen, pooled features of every image (augmented views for training images).
      const extractor = tf.model({ inputs: baseModel.inputs, outputs: baseModel.getLayer(base.featureLayer).output as tf.SymbolicTensor });
      const pooled = await phase(
        "features",
        () =>
          extractSplits(store, extractor, pooledSpec, { train, heldOut: val }, (split, d, t) => log.progress(`features (${split})`, d, t), {
            beforeCompute:
              context.fanOut &&
              fanOutHook(context.fanOut, { dataset: dataset.name, base: base.id, imageSize: size, views: options.views, seed: options.seed }, log),
          }),
        (f) => ({ ...f.stats }),
      );
      const usableTrain = train.filter((i) => pooled.byId.has(i.id));
      const usableVal = val.filter((i) => pooled.byId.has(i.id));
      const skipped = [...pooled.failed.entries()].map(([, f]) => f);
      for (const s of skipped) log.warn(`skipped ${s.key}: ${s.reason}`);
      if (usableTrain.length === 0)
        throw new DatasetError(`Dataset ${dataset.name}: none of its training images could be decoded (see the skipped files above).`);

      // Training rows: every augmented view of a training image; held-out rows: view 0, as served.
      const rowsOf = (f: Features, images: readonly DatasetImage[], views: number): TrainData => {
        const picked = images.flatMap((img) => (f.byId.get(img.id) ?? []).slice(0, views).map((v) => ({ img, v })));
        return { rows: picked.map((p) => p.v), shape: f.shape, y: Int32Array.from(picked, (p) => labelIndex.get(p.img.label) as number) };
      };
      const dim = pooled.shape.reduce((a, b) => a * b, 1);
      const trainData = rowsOf(pooled, usableTrain, options.views);
      const valData = rowsOf(pooled, usableVal, 1);
      const yVal = valData.y;

      const head = headLayers(dataset.labels.length, { ...options.head, seed: options.seed });
      const headInput = tf.input({ shape: [dim] });
      const headModel = tf.model({ inputs: headInput, outputs: applyLayers(head, headInput) });
      // Warm start: a retrain of the same dataset (same labels, same features) starts from the served head.
      const comparable = (m: ArtifactMetadata) =>
        m.base.sha256 === base.sha256 &&
        m.base.featureLayer === base.featureLayer &&
        m.input.size === size &&
        m.strategy === "head" &&
        JSON.stringify(m.preprocessing) === JSON.stringify(preprocessing);
      // The served version, read once: it seeds the warm start and is scored against the new one.
      const current = await loadCurrent(store, name);
      if (current && "model" in current) disposables.push(current.model);
      const warm = currentHeadWeights(current, dataset.name, dataset.labels, comparable);
      if (warm) {
        for (const layer of head) {
          const w = warm.weights.get(layer.name);
          if (w && w.length === layer.getWeights().length && w.every((t, i) => t.shape.join() === layer.getWeights()[i]?.shape.join())) layer.setWeights(w);
        }
        for (const ts of warm.weights.values()) for (const t of ts) t.dispose();
        log.info(`head starts from version ${warm.version}`);
      }
      const history: { head: EpochLog[]; fineTune: EpochLog[] } = { head: [], fineTune: [] };
      history.head = await phase("train head", () =>
        trainModel(headModel, trainData, usableVal.length > 0 ? valData : undefined, dataset.labels.length, { ...options.head, seed: options.seed }, (e) =>
          log.progress("train head", e.epoch, options.head.epochs),
        ),
      );
      let valProbs = await predictRows(headModel, valData);

      if (options.strategy === "finetune") {
        const from = options.fineTune.from ?? base.fineTuneFrom;
        if (!from) throw new EdgetuneError("invalid_option", `Base ${base.id} names no fine-tuning cut; pass --fine-tune-from <layer>.`);
        const bottom = tf.model({ inputs: baseModel.inputs, outputs: baseModel.getLayer(from).output as tf.SymbolicTensor });
        const bottomSpec: ExtractorSpec = { ...pooledSpec, layer: from, pooled: false };
        const maps = await phase(
          "bottom features",
          () => extractSplits(store, bottom, bottomSpec, { train: usableTrain, heldOut: usableVal }, (split, d, t) => log.progress(`bottom (${split})`, d, t)),
          (f) => ({ ...f.stats, shape: f.shape.join("×") }),
        );
        const mapsTrain = rowsOf(maps, usableTrain, options.views);
        const mapsVal = rowsOf(maps, usableVal, 1);
        const top = buildTop(baseModel, from, base.featureLayer, head);
        const fineTuneCheckpoint = s3Checkpointer(store, name, version, "finetune");
        history.fineTune = await phase("fine-tune", () =>
          trainModel(
            top,
            mapsTrain,
            usableVal.length > 0 ? mapsVal : undefined,
            dataset.labels.length,
            { ...options.fineTune, seed: options.seed, optimizer: "adam" },
            (e) => (e.resumed ? log.info(`fine-tuning resumes after epoch ${e.epoch}`) : log.progress("fine-tune", e.epoch, options.fineTune.epochs)),
            fineTuneCheckpoint,
          ),
        );
        valProbs = await predictRows(top, mapsVal);
      }

      const evaluation = evaluate(
        dataset.labels,
        Array.from(yVal),
        valProbs,
        usableVal.map((i) => i.key),
        history.fineTune.at(-1)?.valLoss ?? history.head.at(-1)?.valLoss,
      );
      log.info("evaluation", { accuracy: evaluation.metrics.accuracy, evaluatedOn: evaluation.metrics.evaluatedOn });

      const classifier = buildClassifier(baseModel, base.featureLayer, size, head);
      const probe = await probeInputs(store, usableVal.length > 0 ? usableVal : usableTrain, size, preprocessing);
      disposables.push(probe);
      const exported = await phase(
        "export",
        async () => {
          const attempt = await exportClassifier(classifier, options.weights, probe, options.weights === "uint8" ? 1 : 0.02);
          if (options.weights === "uint8" && attempt.argmaxChanged > 0) {
            log.warn(`uint8 weights changed ${attempt.argmaxChanged} prediction(s) on held-out images; exporting float16 instead`);
            return { ...(await exportClassifier(classifier, "float16", probe, 0.02)), dtype: "float16" as const };
          }
          return { ...attempt, dtype: options.weights };
        },
        (e) => ({ dtype: e.dtype, bytes: e.files.weights.byteLength, maxDelta: e.maxDelta }),
      );

      const score =
        current && "model" in current
          ? await phase("score current", () =>
              scoreCurrent(store, current, usableVal, (img) => (pooled.byId.get(img.id) as Float32Array[] | undefined)?.[0], comparable),
            )
          : null;
      const accuracy = evaluation.metrics.accuracy;
      let promote: { promoted: boolean; reason: string; current?: { version: string; accuracy: number } };
      if (current === null || score === null) {
        promote =
          current && "error" in current
            ? { promoted: true, reason: `replacing a broken current version: ${current.error}` }
            : { promoted: true, reason: "first version of this model" };
      } else if (accuracy + options.promotionTolerance >= score.accuracy) {
        promote = {
          promoted: true,
          reason: `accuracy ${pct(accuracy)} vs current ${score.version} ${pct(score.accuracy)} on the same ${score.evaluatedOn} held-out images (tolerance ${pct(options.promotionTolerance)})`,
          current: score,
        };
      } else {
        promote = {
          promoted: false,
          reason: `worse than current ${score.version}: ${pct(accuracy)} vs ${pct(score.accuracy)} on the same ${score.evaluatedOn} held-out images (tolerance ${pct(options.promotionTolerance)}); keeping it`,
          current: score,
        };
      }

      const report: TrainingReport = {
        name,
        version,
        dataset: { name: dataset.name, layout: dataset.layout, fingerprint: dataset.fingerprint, labels: dataset.labels, counts: countSplits(dataset) },
        skipped,
        ignored: dataset.ignored,
        warnings: dataset.warnings,
        backend: { name: backend.name, reason: backend.reason },
        base: { id: base.id, featureLayer: base.featureLayer, sha256: base.sha256 },
        options: options as unknown as Record<string, unknown>,
        phases,
        history,
        metrics: evaluation.metrics,
        confusion: evaluation.confusion,
        mistakes: await withThumbnails(store, evaluation.mistakes),
        export: { dtype: exported.dtype, bytes: exported.files.weights.byteLength, maxDelta: exported.maxDelta },
        promotion: promote,
      };
      const metadata: Omit<ArtifactMetadata, "files"> = {
        schemaVersion: 1,
        name,
        version,
        createdAt: new Date().toISOString(),
        labels: dataset.labels,
        input: { size, channels: 3 },
        preprocessing,
        base: { id: base.id, sha256: base.sha256, featureLayer: base.featureLayer },
        strategy: options.strategy,
        hyperparameters: {
          views: options.views,
          seed: options.seed,
          headUnits: options.head.units,
          headDropout: options.head.dropout,
          headLearningRate: options.head.learningRate,
          headEpochs: options.head.epochs,
          fineTuneFrom: options.strategy === "finetune" ? (options.fineTune.from ?? base.fineTuneFrom ?? null) : null,
          fineTuneLearningRate: options.strategy === "finetune" ? options.fineTune.learningRate : null,
          fineTuneEpochs: options.strategy === "finetune" ? options.fineTune.epochs : null,
        },
        dataset: { name: dataset.name, fingerprint: dataset.fingerprint, images: usableTrain.length + usableVal.length, skipped: skipped.length },
        metrics: evaluation.metrics,
        weights: { dtype: exported.dtype, bytes: exported.files.weights.byteLength },
        libraries: LIBRARIES,
      };
      let written: Awaited<ReturnType<typeof writeArtifact>>;
      try {
        written = await phase("write version", () =>
          writeArtifact(store, metadata, [
            { path: "model.json", bytes: exported.files.modelJson },
            { path: WEIGHTS_FILE, bytes: exported.files.weights },
            { path: "report.json", bytes: new TextEncoder().encode(JSON.stringify(report, null, 2)) },
            { path: "report.html", bytes: new TextEncoder().encode(renderReportHtml(report)) },
          ]),
        );
      } catch (e) {
        // The same trigger delivered twice, running at once: the other run wrote this version first.
        if (e instanceof VersionExistsError) {
          log.info(`version ${version} was written by a concurrent run; nothing to do`);
          return { status: "exists", name, version, promoted: false, reason: "written by a concurrent run of the same dataset and config" };
        }
        throw e;
      }
      await s3Checkpointer(store, name, version, "finetune").clear();
      if (promote.promoted) {
        await writePointer(store, name, {
          version,
          metadataSha256: written.metadataSha256,
          promotedAt: new Date().toISOString(),
          previous: score?.version ?? null,
          reason: promote.reason,
        });
      }
      log.info(promote.promoted ? `promoted ${name} ${version}` : `kept the current version of ${name}`, { reason: promote.reason, accuracy });
      return { status: "trained", name, version, promoted: promote.promoted, reason: promote.reason, accuracy, report };
    } finally {
      for (const d of disposables) d.dispose();
    }
  }
}

/** A few real preprocessed images to check the export against. */
async function probeInputs(store: ObjectStore, images: DatasetImage[], size: number, spec: PreprocessingSpec): Promise<tf.Tensor4D> {
  const rows: Float32Array[] = [];
  for (const image of images) {
    if (rows.length >= 8) break;
    const bytes = await store.get(image.key);
    if (!bytes) continue;
    try {
      rows.push(preprocess(await decodeImage(bytes), size, spec));
    } catch {
      // skipped images were reported already
    }
  }
  return tf.tensor4d(concatRows(rows), [rows.length, size, size, 3]);
}

async function withThumbnails(store: ObjectStore, mistakes: TrainingReport["mistakes"]): Promise<TrainingReport["mistakes"]> {
  return Promise.all(
    mistakes.map(async (m) => {
      const bytes = await store.get(m.key).catch(() => null);
      if (!bytes) return m;
      try {
        const jpeg = await sharp(bytes, { pages: 1 }).rotate().resize(96, 96, { fit: "cover" }).jpeg({ quality: 70 }).toBuffer();
        return { ...m, thumbnail: `data:image/jpeg;base64,${jpeg.toString("base64")}` };
      } catch {
        return m;
      }
    }),
  );
}

function countSplits(d: Dataset): Record<string, { train: number; val: number; test: number }> {
  const counts: Record<string, { train: number; val: number; test: number }> = {};
  for (const i of d.images) {
    counts[i.label] ??= { train: 0, val: 0, test: 0 };
    (counts[i.label] as { train: number; val: number; test: number })[i.split]++;
  }
  return counts;
}

const pct = (v: number) => `${(v * 100).toFixed(1)} %`;

export type { TrainOptions };

/**
 * What the frozen features of a run are made of: the preprocessing the base expects and the extractor
 * spec (which is also the cache key of the feature packs). Shared by `train` and `embedShard`, so an
 * array job's packs are the ones training looks for.
 */
export function featureSpec(base: BaseMetadata, options: TrainOptions): { preprocessing: PreprocessingSpec; pooledSpec: ExtractorSpec } {
  const preprocessing: PreprocessingSpec = { version: PREPROCESSING_VERSIONS[0], fit: "center-crop", normalization: base.normalization };
  return {
    preprocessing,
    pooledSpec: {
      baseSha256: base.sha256,
      layer: base.featureLayer,
      pooled: true,
      size: options.imageSize,
      preprocessing,
      views: options.views,
      seed: options.seed,
    },
  };
}
