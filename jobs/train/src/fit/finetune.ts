import * as tf from "@tensorflow/tfjs";
import { applyBetween, layersBetween } from "../model/graph.ts";
import { applyLayers, LAYER_NAMES } from "./head.ts";

/**
 * Strategy 2: retrain the top of the base together with the head, at a very small learning rate.
 * The frozen bottom (input → `from`) is never run during training: its outputs are cached like
 * embeddings, which makes an epoch several times cheaper and keeps memory flat.
 *
 * BatchNormalization stays in inference mode with its statistics and affine parameters frozen, as
 * Keras does for a frozen base. tfjs-layers' BatchNormalization ignores `trainable` and switches to
 * batch statistics whenever `fit` runs, which wrecks pretrained features on small batches; so its
 * `call` is wrapped here to force `training: false`.
 */
export function buildTop(base: tf.LayersModel, from: string, featureLayer: string, head: tf.layers.Layer[]): tf.LayersModel {
  const fromShape = (base.getLayer(from).outputShape as (number | null)[]).slice(1) as number[];
  const input = tf.input({ shape: fromShape, name: "cached_bottom" });
  for (const layer of layersBetween(base, featureLayer, from)) {
    if (layer.getClassName() === "BatchNormalization") holdInInference(layer);
    else layer.trainable = true;
  }
  const features = applyBetween(base, input, featureLayer, from);
  const pooled = tf.layers.globalAveragePooling2d({ name: `${LAYER_NAMES.pool}_top` }).apply(features) as tf.SymbolicTensor;
  return tf.model({ inputs: input, outputs: applyLayers(head, pooled), name: "edgetune_top" });
}

const held = new WeakSet<tf.layers.Layer>();

export function holdInInference(layer: tf.layers.Layer): void {
  layer.trainable = false;
  if (held.has(layer)) return;
  held.add(layer);
  const call = layer.call.bind(layer);
  layer.call = (inputs, kwargs) => call(inputs, { ...kwargs, training: false });
}
