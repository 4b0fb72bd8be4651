#!/usr/bin/env node
/**
 * `npm run bench:finetune` — one fine-tuning epoch of the top blocks trained on the cached output of
 * the frozen bottom (what edgetune does) against the same training run end to end from images, in
 * one run, same model, same trainable layers, same batches.
 */
import * as tf from "@tensorflow/tfjs";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { buildTop } from "../jobs/train/src/fit/finetune.ts";
import { DEFAULT_HEAD, headLayers, LAYER_NAMES } from "../jobs/train/src/fit/head.ts";
import { initBackend } from "../jobs/train/src/model/backend.ts";
import { ensureBase, loadBase } from "../jobs/train/src/model/bases.ts";
import { applyBetween, layersBetween } from "../jobs/train/src/model/graph.ts";
import { arg, BENCH_BASE, machine } from "./common.ts";

const size = Number(arg("size", "224"));
const n = Number(arg("samples", "64"));
const batchSize = 16;
const backend = await initBackend();
const s3 = await startLocalS3();
const meta = await ensureBase(s3.store, BENCH_BASE);
const base = await loadBase(s3.store, meta, size);
const from = meta.fineTuneFrom as string;
const head = headLayers(2, { ...DEFAULT_HEAD });
const x = tf.randomUniform([n, size, size, 3], 0, 1);
const y = tf.oneHot(
  tf.tensor1d(
    Array.from({ length: n }, (_, i) => i % 2),
    "int32",
  ),
  2,
);

// Cached bottom: the frozen part runs once (that cost is reported separately), then epochs run the top only.
const bottom = tf.model({ inputs: base.inputs, outputs: base.getLayer(from).output as tf.SymbolicTensor });
let t = performance.now();
const maps = bottom.predict(x, { batchSize }) as tf.Tensor;
await maps.data();
const bottomOnce = (performance.now() - t) / 1000;
const top = buildTop(base, from, meta.featureLayer, head);
top.compile({ optimizer: tf.train.adam(5e-5), loss: "categoricalCrossentropy" });
await top.fit(maps, y, { epochs: 1, batchSize, verbose: 0 }); // warm-up
t = performance.now();
await top.fit(maps, y, { epochs: 1, batchSize, verbose: 0 });
const cachedEpoch = (performance.now() - t) / 1000;

// End to end: image → frozen bottom → same top layers, in every step.
for (const l of base.layers) if (!layersBetween(base, meta.featureLayer, from).includes(l)) l.trainable = false;
const input = tf.input({ shape: [size, size, 3] });
const pooled = tf.layers.globalAveragePooling2d({ name: `${LAYER_NAMES.pool}_e2e` }).apply(applyBetween(base, input, meta.featureLayer)) as tf.SymbolicTensor;
const full = tf.model({ inputs: input, outputs: head.reduce((s, l) => l.apply(s) as tf.SymbolicTensor, pooled) });
full.compile({ optimizer: tf.train.adam(5e-5), loss: "categoricalCrossentropy" });
await full.fit(x.slice(0, batchSize), y.slice(0, batchSize), { epochs: 1, batchSize, verbose: 0 }); // warm-up
t = performance.now();
await full.fit(x, y, { epochs: 1, batchSize, verbose: 0 });
const endToEndEpoch = (performance.now() - t) / 1000;
await s3.stop();

console.log(
  `Fine-tuning epoch, ${n} samples at ${size} px, batch ${batchSize}, base ${meta.id}, top = ${from} → ${meta.featureLayer}, backend ${backend.name} (${machine()})\n`,
);
console.log("| variant | epoch |\n|---|---|");
console.log(`| end to end (frozen bottom recomputed every step) | ${endToEndEpoch.toFixed(2)} s |`);
console.log(`| cached bottom (edgetune) | ${cachedEpoch.toFixed(2)} s (+ ${bottomOnce.toFixed(2)} s once to cache the bottom) |`);
console.log(`\nend to end / cached: ${(endToEndEpoch / cachedEpoch).toFixed(2)}× per epoch`);
