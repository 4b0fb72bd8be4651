import * as tf from "@tensorflow/tfjs";

/**
 * Folds every BatchNormalization that directly follows a Conv2D or DepthwiseConv2D into that
 * convolution (kernel × γ/√(σ²+ε) per output channel, bias (b − μ)·γ/√(σ²+ε) + β). The folded conv
 * takes the BN layer's name, so feature-layer and cut names keep working.
 *
 * Why: at inference this is the same function with one layer fewer per block (≈ 15 % faster in
 * workerd); in fine-tuning it is exactly "BatchNorm frozen in inference mode", which tfjs-layers
 * cannot express (its BN reads only the `training` flag, see finetune.ts), and it removes the BN
 * gradient ops that dominate a wasm backward pass. Only Keras-style channels-last layers are folded.
 */
interface LayerJson {
  name: string;
  class_name: string;
  config: Record<string, unknown>;
  inbound_nodes: [string, number, number, Record<string, unknown>][][];
}

export function foldBatchNorm(
  config: { layers: LayerJson[] },
  weights: tf.NamedTensorMap,
): { layers: LayerJson[]; weights: tf.NamedTensorMap; folded: number } {
  const consumers = new Map<string, number>();
  for (const l of config.layers) for (const node of l.inbound_nodes) for (const [src] of node) consumers.set(src, (consumers.get(src) ?? 0) + 1);
  const byName = new Map(config.layers.map((l) => [l.name, l]));
  const out = { ...weights };
  const removed = new Set<string>();
  let folded = 0;
  for (const bn of config.layers) {
    if (bn.class_name !== "BatchNormalization") continue;
    const axis = bn.config.axis;
    if (!(axis === -1 || axis === 3 || (Array.isArray(axis) && axis.length === 1 && (axis[0] === -1 || axis[0] === 3)))) continue;
    const inbound = bn.inbound_nodes[0];
    if (bn.inbound_nodes.length !== 1 || inbound?.length !== 1) continue;
    const conv = byName.get(inbound[0]?.[0] ?? "");
    if (!conv || (conv.class_name !== "Conv2D" && conv.class_name !== "DepthwiseConv2D") || consumers.get(conv.name) !== 1) continue;
    if (conv.config.activation !== "linear" && conv.config.activation !== undefined) continue;
    const kernelName = conv.class_name === "Conv2D" ? "kernel" : "depthwise_kernel";
    const kernel = out[`${conv.name}/${kernelName}`];
    const mean = out[`${bn.name}/moving_mean`];
    const variance = out[`${bn.name}/moving_variance`];
    if (!kernel || !mean || !variance) continue;
    const eps = (bn.config.epsilon as number | undefined) ?? 1e-3;
    const channels = mean.shape[0] as number;
    const gamma = bn.config.scale === false ? tf.ones([channels]) : out[`${bn.name}/gamma`];
    const beta = bn.config.center === false ? tf.zeros([channels]) : out[`${bn.name}/beta`];
    if (!gamma || !beta) continue;
    const oldBias = conv.config.use_bias ? out[`${conv.name}/bias`] : undefined;
    const [newKernel, newBias] = tf.tidy(() => {
      const s = tf.div(gamma, tf.sqrt(tf.add(variance, eps)));
      // Conv2D kernel [kh, kw, in, out]: scale the last axis. Depthwise [kh, kw, C, M]: output channel c·M + m.
      const k = kernel.shape as number[];
      const scaled = conv.class_name === "Conv2D" ? tf.mul(kernel, s) : tf.reshape(tf.mul(tf.reshape(kernel, [k[0] as number, k[1] as number, -1]), s), k);
      const b = tf.add(tf.mul(tf.sub(oldBias ?? tf.zeros([channels]), mean), s), beta);
      return [scaled, b];
    });
    for (const key of Object.keys(out)) if (key.startsWith(`${conv.name}/`) || key.startsWith(`${bn.name}/`)) delete out[key];
    out[`${bn.name}/${kernelName}`] = newKernel as tf.Tensor;
    out[`${bn.name}/bias`] = newBias as tf.Tensor;
    // The conv, renamed, replaces the BN layer in the graph.
    conv.config = { ...conv.config, name: bn.name, use_bias: true };
    conv.name = bn.name;
    bn.name = `${bn.name}__folded`;
    removed.add(bn.name);
    folded++;
  }
  return { layers: config.layers.filter((l) => !removed.has(l.name)), weights: out, folded };
}
