import * as tf from "@tensorflow/tfjs";
import { mulberry32 } from "./augment.ts";

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
  pool: "edgetune_pool",
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

export interface TrainData {
  x: tf.Tensor;
  /** Class index per row. */
  y: Int32Array;
}

/**
 * Trains `model` (input → softmax) with Adam, shuffling with a seeded generator, class-weighted for
 * lopsided data, keeping the weights of the epoch with the best validation loss, and stopping when
 * that loss has not improved for `patience` epochs.
 */
export async function trainModel(
  model: tf.LayersModel,
  train: TrainData,
  val: TrainData | undefined,
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
  const rand = mulberry32(cfg.seed);
  const n = train.y.length;
  const yTrain = tf.oneHot(tf.tensor1d(train.y, "int32"), classes);
  const yVal = val ? tf.oneHot(tf.tensor1d(val.y, "int32"), classes) : undefined;
  let history: EpochLog[] = [];
  let best: { loss: number; epoch: number; weights: tf.Tensor[] } | undefined;
  const shuffled = () => {
    const order = Int32Array.from({ length: n }, (_, i) => i);
    for (let i = n - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1));
      [order[i], order[j]] = [order[j] as number, order[i] as number];
    }
    return order;
  };
  let firstEpoch = 1;
  const resumed = await checkpoint?.load();
  if (resumed) {
    // Continue after the last finished epoch: same weights, same shuffles from here on. The
    // optimizer's moments start afresh (they are not checkpointed).
    model.setWeights(resumed.weights);
    history = resumed.history;
    if (resumed.best) best = { loss: resumed.best.loss, epoch: resumed.best.epoch, weights: resumed.best.weights };
    for (let e = 1; e <= resumed.epoch; e++) shuffled();
    firstEpoch = resumed.epoch + 1;
    for (const w of resumed.weights) w.dispose();
    onEpoch({ ...(history.at(-1) as EpochLog), resumed: true });
  }
  try {
    for (let epoch = firstEpoch; epoch <= cfg.epochs; epoch++) {
      if (best && cfg.patience !== undefined && epoch - 1 - best.epoch >= cfg.patience) break;
      const order = shuffled();
      const idx = tf.tensor1d(order, "int32");
      const xs = tf.gather(train.x, idx);
      const ys = tf.gather(yTrain, idx);
      idx.dispose();
      const h = await model.fit(xs, ys, { epochs: 1, batchSize: cfg.batchSize, shuffle: false, verbose: 0, classWeight });
      xs.dispose();
      ys.dispose();
      const log: EpochLog = { epoch, loss: h.history.loss?.[0] as number, accuracy: (h.history.acc?.[0] ?? h.history.accuracy?.[0]) as number };
      if (val && yVal) {
        const [l, a] = model.evaluate(val.x, yVal, { batchSize: 256 }) as tf.Scalar[];
        log.valLoss = (await l?.data())?.[0];
        log.valAccuracy = (await a?.data())?.[0];
        l?.dispose();
        a?.dispose();
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
    yTrain.dispose();
    yVal?.dispose();
    for (const w of best?.weights ?? []) w.dispose();
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
