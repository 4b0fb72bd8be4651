import * as tf from "@tensorflow/tfjs";
import { EdgetuneError } from "#shared/errors.ts";

/**
 * Graph surgery on functional LayersModels: run a contiguous part of a model on a new input, reusing
 * (sharing) the original layer objects and so their weights. This is how edgetune
 *  - cuts a base at its feature layer,
 *  - splits it into a frozen bottom and a trainable top for fine-tuning (the top's input is the
 *    cached output of `from`), and
 *  - assembles the exported classifier (base → pooling → head) as one flat model.
 * The cut must be clean: every path from the model input to `to` must pass through `from`.
 */
export class GraphCutError extends EdgetuneError {
  constructor(message: string) {
    super("invalid_cut", message);
  }
}

function inboundNames(layer: tf.layers.Layer): string[] {
  const node = layer.inboundNodes[0];
  return node ? node.inboundLayers.map((l) => l.name) : [];
}

/** Layers needed to compute `to` (one layer or several) from `from` (or from the model input), in topological order. */
export function layersBetween(model: tf.LayersModel, to: string | readonly string[], from?: string): tf.layers.Layer[] {
  const byName = new Map(model.layers.map((l) => [l.name, l]));
  const targets = typeof to === "string" ? [to] : to;
  for (const t of targets)
    if (!byName.has(t))
      throw new GraphCutError(
        `Layer "${t}" is not in model ${model.name}. Some layers it has: ${model.layers
          .slice(-5)
          .map((l) => l.name)
          .join(", ")}.`,
      );
  if (from !== undefined && !byName.has(from)) throw new GraphCutError(`Layer "${from}" is not in model ${model.name}.`);
  const inputNames = new Set(model.inputLayers.map((l) => l.name));
  const needed = new Set<string>();
  const stack = [...targets];
  while (stack.length > 0) {
    const name = stack.pop() as string;
    if (needed.has(name) || name === from) continue;
    if (inputNames.has(name)) {
      if (from !== undefined) throw new GraphCutError(`Cutting at "${from}" is not clean: "${name}" depends on the model input by another path.`);
      continue;
    }
    needed.add(name);
    stack.push(...inboundNames(byName.get(name) as tf.layers.Layer));
  }
  return model.layers.filter((l) => needed.has(l.name));
}

/**
 * Applies the layers between `from` (exclusive; default: the model input) and `to` (inclusive) to
 * `input`, returning the symbolic output. Layers are shared with `model`, not copied.
 */
export function applyBetween(model: tf.LayersModel, input: tf.SymbolicTensor, to: string, from?: string): tf.SymbolicTensor {
  return applyBetweenAll(model, input, [to], from)[0] as tf.SymbolicTensor;
}

/** `applyBetween` for several outputs at once: a layer they share is applied once, not once per output. */
export function applyBetweenAll(model: tf.LayersModel, input: tf.SymbolicTensor, to: readonly string[], from?: string): tf.SymbolicTensor[] {
  const outputs = new Map<string, tf.SymbolicTensor>();
  outputs.set(from ?? (model.inputLayers[0]?.name as string), input);
  for (const layer of layersBetween(model, to, from)) {
    const ins = inboundNames(layer).map((n) => {
      const t = outputs.get(n);
      if (!t) throw new GraphCutError(`Layer "${layer.name}" needs "${n}", which is outside the cut.`);
      return t;
    });
    outputs.set(layer.name, layer.apply(ins.length === 1 ? (ins[0] as tf.SymbolicTensor) : ins) as tf.SymbolicTensor);
  }
  return to.map((t) => outputs.get(t) as tf.SymbolicTensor);
}

/**
 * The pooled feature vector of a run: each of `maps` (feature maps of the layers pooled, the feature
 * layer's last) averaged over space, concatenated when there are several. Named `edgetune_pool`, where
 * the exported classifier is cut back to score a served head on cached features (release/promote.ts).
 */
export function poolMaps(maps: readonly tf.SymbolicTensor[], name: string): tf.SymbolicTensor {
  if (maps.length === 1) return tf.layers.globalAveragePooling2d({ name }).apply(maps[0] as tf.SymbolicTensor) as tf.SymbolicTensor;
  const pooled = maps.map((m, i) => tf.layers.globalAveragePooling2d({ name: `${name}_${i}` }).apply(m) as tf.SymbolicTensor);
  return tf.layers.concatenate({ name, axis: -1 }).apply(pooled) as tf.SymbolicTensor;
}

/** Output shape (without batch) of a layer. */
export function outputShape(model: tf.LayersModel, layer: string): number[] {
  const shape = model.getLayer(layer).outputShape as (number | null)[];
  return shape.slice(1).map((d) => d ?? -1);
}
