import * as tf from "@tensorflow/tfjs";
import { POOL_LAYER } from "#shared/novelty.ts";
import { mulberry32 } from "../dataset/augment.ts";
import type { RowSource } from "./rows.ts";

/**
 * Strategy 1: a new dense head (random init, seeded) on frozen, pooled base features.
 * The head is [Dropout → Dense(units, relu) →] Dropout → Dense(labels, softmax); its layers are named
 * so the exported model can be cut back at `edgetune_pool` (see promote.ts).
 */
export interface HeadConfig {
  /** Hidden units; 0 means a single softmax layer (logistic regression on the features). */
  units: number;
  dropout: number;
  learningRate: number;
  epochs: number;
  batchSize: number;
  /** L2 on the kernels: small datasets overfit 1280-d features quickly. */
  l2: number;
  seed: number;
}

export const DEFAULT_HEAD: HeadConfig = { units: 0, dropout: 0.2, learningRate: 1e-3, epochs: 30, batchSize: 32, l2: 1e-4, seed: 42 };

export const LAYER_NAMES = {
  /** The pooled features' layer: the name the edge's novelty rule reads them by (shared/novelty.ts). */
  pool: POOL_LAYER,
  dropout: "edgetune_dropout",
  hidden: "edgetune_hidden",
  hiddenDropout: "edgetune_hidden_dropout",
  logits: "edgetune_logits",
} as const;

/** Head layers, to be applied to a pooled feature tensor (in training) or inside the full model (export). */
export function headLayers(classes: number, cfg: HeadConfig): tf.layers.Layer[] {
  const layers: tf.layers.Layer[] = [tf.layers.dropout({ rate: cfg.dropout, name: LAYER_NAMES.dropout, seed: cfg.seed })];
  if (cfg.units > 0) {
    layers.push(
      tf.layers.dense({
        units: cfg.units,
        activation: "relu",
        name: LAYER_NAMES.hidden,
        kernelInitializer: tf.initializers.heNormal({ seed: cfg.seed }),
        kernelRegularizer: tf.regularizers.l2({ l2: cfg.l2 }),
      }),
      tf.layers.dropout({ rate: cfg.dropout, name: LAYER_NAMES.hiddenDropout, seed: cfg.seed + 1 }),
    );
  }
  layers.push(
    tf.layers.dense({
      units: classes,
      activation: "softmax",
      name: LAYER_NAMES.logits,
      kernelInitializer: tf.initializers.glorotUniform({ seed: cfg.seed + 2 }),
      kernelRegularizer: tf.regularizers.l2({ l2: cfg.l2 }),
    }),
  );
  return layers;
}

export function applyLayers(layers: tf.layers.Layer[], x: tf.SymbolicTensor): tf.SymbolicTensor {
  return layers.reduce((t, l) => l.apply(t) as tf.SymbolicTensor, x);
}

export interface EpochLog {
  epoch: number;
  /** Set on the notice that training continues from a checkpoint after this epoch. */
  resumed?: boolean;
  loss: number;
  accuracy: number;
  valLoss?: number;
  valAccuracy?: number;
}

/** Equal-length rows, one after the other in one array (a tensor body). */
export function concatRows(rows: readonly Float32Array[]): Float32Array {
  const dim = rows[0]?.length ?? 0;
  const out = new Float32Array(rows.length * dim);
  for (const [i, r] of rows.entries()) out.set(r, i * dim);
  return out;
}

/**
 * Predictions for every row of `data`, in row order, a batch at a time. Rows stay in host memory or
 * in their packs (rows.ts) and reach the backend one batch at a time: the wasm heap is capped at
 * 4 GiB, and a training set of maps held there whole overflowed it on flowers128.
 */
export async function predictRows(model: tf.LayersModel, data: RowSource, batchSize = 256): Promise<Float32Array[]> {
  const out: Float32Array[] = new Array(data.y.length);
  for await (const { ids, values } of data.batches(batchSize, null)) {
    const p = tf.tidy(() => model.predict(tf.tensor(values, [ids.length, ...data.shape])) as tf.Tensor2D);
    const flat = (await p.data()) as Float32Array;
    const classes = p.shape[1];
    p.dispose();
    ids.forEach((row, i) => {
      out[row] = flat.slice(i * classes, (i + 1) * classes);
    });
  }
  return out;
}

/** Mean loss and accuracy over every row, a batch at a time. */
async function evaluateRows(model: tf.LayersModel, data: RowSource, classes: number, batchSize = 256): Promise<{ loss: number; accuracy: number }> {
  let loss = 0;
  let accuracy = 0;
  for await (const { ids, values } of data.batches(batchSize, null)) {
    const [l, a] = tf.tidy(() => model.evaluate(tf.tensor(values, [ids.length, ...data.shape]), oneHotRows(data, ids, classes), { batchSize }) as tf.Scalar[]);
    loss += ((await l?.data())?.[0] ?? 0) * ids.length;
    accuracy += ((await a?.data())?.[0] ?? 0) * ids.length;
    l?.dispose();
    a?.dispose();
  }
  return { loss: loss / data.y.length, accuracy: accuracy / data.y.length };
}

function oneHotRows(data: Pick<RowSource, "y">, ids: ArrayLike<number>, classes: number): tf.Tensor {
  return tf.tidy(() =>
    tf.oneHot(
      tf.tensor1d(
        Int32Array.from(ids, (i) => data.y[i] as number),
        "int32",
      ),
      classes,
    ),
  );
}

/**
 * Trains `model` (input → softmax) with Adam, shuffling with a seeded generator, class-weighted for
 * lopsided data, keeping the weights of the epoch with the best validation loss, and stopping when
 * that loss has not improved for `patience` epochs.
 */
export async function trainModel(
  model: tf.LayersModel,
  train: RowSource,
  val: RowSource | undefined,
  classes: number,
  cfg: { learningRate: number; epochs: number; batchSize: number; seed: number; optimizer?: "adam" | "rmsprop"; patience?: number },
  onEpoch: (log: EpochLog) => void = () => {},
  checkpoint?: Checkpointer,
): Promise<EpochLog[]> {
  model.compile({
    optimizer: cfg.optimizer === "rmsprop" ? tf.train.rmsprop(cfg.learningRate) : tf.train.adam(cfg.learningRate),
    loss: "categoricalCrossentropy",
    metrics: ["accuracy"],
  });
  const counts = new Array<number>(classes).fill(0);
  for (const c of train.y) counts[c] = (counts[c] ?? 0) + 1;
  const classWeight: Record<number, number> = {};
  counts.forEach((n, c) => {
    classWeight[c] = n > 0 ? train.y.length / (classes * n) : 1;
  });
  let history: EpochLog[] = [];
  let best: { loss: number; epoch: number; weights: tf.Tensor[] } | undefined;
  // One seeded generator per epoch: a resumed run shuffles exactly as the uninterrupted one would.
  const randOf = (epoch: number) => mulberry32(cfg.seed + epoch * 7919);
  let firstEpoch = 1;
  const resumed = await checkpoint?.load();
  if (resumed) {
    // Continue after the last finished epoch: same weights, same shuffles from here on. The
    // optimizer's moments start afresh (they are not checkpointed).
    model.setWeights(resumed.weights);
    history = resumed.history;
    if (resumed.best) best = { loss: resumed.best.loss, epoch: resumed.best.epoch, weights: resumed.best.weights };
    firstEpoch = resumed.epoch + 1;
    for (const w of resumed.weights) w.dispose();
    onEpoch({ ...(history.at(-1) as EpochLog), resumed: true });
  }
  try {
    for (let epoch = firstEpoch; epoch <= cfg.epochs; epoch++) {
      if (best && cfg.patience !== undefined && epoch - 1 - best.epoch >= cfg.patience) break;
      const rows = train.batches(cfg.batchSize, randOf(epoch));
      // One tensor per batch, built from host memory (or a pack) and disposed by fitDataset after its step.
      const batches = tf.data.generator(async function* () {
        for await (const { ids, values } of rows) {
          yield tf.tidy(() => ({ xs: tf.tensor(values, [ids.length, ...train.shape]), ys: oneHotRows(train, ids, classes) }));
        }
      });
      const h = await model.fitDataset(batches, { epochs: 1, verbose: 0, classWeight });
      const log: EpochLog = { epoch, loss: h.history.loss?.[0] as number, accuracy: (h.history.acc?.[0] ?? h.history.accuracy?.[0]) as number };
      if (val && val.y.length > 0) {
        const v = await evaluateRows(model, val, classes);
        log.valLoss = v.loss;
        log.valAccuracy = v.accuracy;
        if (log.valLoss !== undefined && (!best || log.valLoss < best.loss - 1e-4)) {
          for (const w of best?.weights ?? []) w.dispose();
          best = { loss: log.valLoss, epoch, weights: model.getWeights().map((w) => w.clone()) };
        }
      }
      history.push(log);
      onEpoch(log);
      await checkpoint?.save({ epoch, history, weights: model.getWeights(), best: best && { loss: best.loss, epoch: best.epoch, weights: best.weights } });
      // Early stopping: no better validation loss for `patience` epochs.
      if (best && cfg.patience !== undefined && epoch - best.epoch >= cfg.patience) break;
    }
    if (best) model.setWeights(best.weights);
  } finally {
    for (const w of best?.weights ?? []) w.dispose();
    // The optimizer was handed in, so model.dispose() would not free its moments: one process may
    // train many datasets in a row (the nightly run).
    model.optimizer.dispose();
  }
  return history;
}

/** Where a long training run keeps its state after every epoch, so a killed job resumes. */
export interface TrainingState {
  epoch: number;
  history: EpochLog[];
  weights: tf.Tensor[];
  best?: { loss: number; epoch: number; weights: tf.Tensor[] };
}
export interface Checkpointer {
  load(): Promise<TrainingState | null>;
  save(state: TrainingState): Promise<void>;
}
