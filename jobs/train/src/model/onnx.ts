import * as tf from "@tensorflow/tfjs";
import onnxProto, { type onnx } from "onnx-proto";
import { EdgetuneError } from "#shared/errors.ts";

/**
 * The frozen part of a base as an ONNX model, for ONNX Runtime (features/onnx-pool.ts). tfjs has no
 * ONNX export, so this is written here, small, for the layer types edgetune's bases use — Conv2D,
 * DepthwiseConv2D, BatchNormalization (what folding left), activations (relu, relu6, leaky relu,
 * sigmoid, linear), ZeroPadding2D, max and average pooling, Add, Dropout — and refuses any other
 * layer with UnsupportedLayerError (training then stays on tfjs). Tested against tfjs on real images
 * (onnx.test.ts): features within 1e-4.
 *
 * Layout: the model takes NHWC like the tfjs one (one Transpose to NCHW up front, as ONNX's
 * convolutions are NCHW) and returns [N, C] features when `pooled` (the mean over space, as
 * extraction pools), or NHWC maps (the fine-tuning cut) otherwise.
 *
 * The whole classifier (export/onnx.ts) goes through the same converter: its pooling, concatenation
 * and Dense head layers are converted here too, and `uint8` puts the base's normalisation into the
 * graph so the model takes the 8-bit pixels the edge's preprocessing rounds to.
 */
export class UnsupportedLayerError extends EdgetuneError {
  readonly layer: string;
  readonly what: string;
  constructor(layer: string, what: string) {
    super("onnx_unsupported", `Layer ${layer} (${what}) has no ONNX export in edgetune; features are computed with tfjs instead.`);
    this.layer = layer;
    this.what = what;
  }
}

// onnx-proto is CommonJS: its namespace comes through the default export under Node ESM.
const proto = onnxProto.onnx;

export const OPSET = 13;
const DEFAULT_INPUT = "input";
const DEFAULT_OUTPUT = "features";

export interface OnnxOptions {
  size: number;
  /** A rank-4 output is pooled to [N, C] (feature extraction) rather than returned as NHWC maps. */
  pooled: boolean;
  /** Take uint8 NHWC pixels and normalise them in the graph (x · scale + offset), as shared/preprocess.ts does after rounding. */
  uint8?: { scale: number; offset: number };
  /** Graph input and output names (default "input" and "features"). */
  names?: { input: string; output: string };
  /**
   * A second output: the cosine of `layer`'s output (pooled features, [N, D]) to the nearest row of
   * `means` (unit rows, R × D), as shared/novelty.ts computes it: L2-normalise, MatMul, ReduceMax.
   */
  similarity?: { layer: string; means: Float32Array; output: string };
  /** The model's metadata_props (ONNX's key–value strings) and doc string. */
  metadata?: Record<string, string>;
  docString?: string;
}

interface Built {
  nodes: onnx.INodeProto[];
  initializers: onnx.ITensorProto[];
}

/** `model` (inputs → its single output) as ONNX bytes; input NHWC [N, size, size, 3]. */
export function toOnnx(model: tf.LayersModel, options: OnnxOptions): Uint8Array {
  const out: Built = { nodes: [], initializers: [] };
  const { input: inputName, output: outputName } = options.names ?? { input: DEFAULT_INPUT, output: DEFAULT_OUTPUT };
  const inputLayer = model.inputLayers[0];
  if (!inputLayer || model.inputLayers.length !== 1 || model.outputs.length !== 1) throw new UnsupportedLayerError(model.name, "not one input and one output");
  // Each layer's output is named after the layer (prefixed, so no layer name can collide with the
  // graph's "input" and "features"); the input layer's is the NCHW transpose of the input.
  let image = inputName;
  if (options.uint8) {
    // The same arithmetic as preprocess's `byte · scale + offset`, in float32.
    node(out, "Cast", [inputName], ["pixels:float"], { to: proto.TensorProto.DataType.FLOAT });
    node(out, "Mul", ["pixels:float", scalar(out, "normalization/scale", options.uint8.scale)], ["pixels:scaled"]);
    node(out, "Add", ["pixels:scaled", scalar(out, "normalization/offset", options.uint8.offset)], ["pixels:normalized"]);
    image = "pixels:normalized";
  }
  node(out, "Transpose", [image], [tensor(inputLayer.name)], { perm: [0, 3, 1, 2] });
  const last = tensor(model.outputs[0]?.sourceLayer.name as string);
  for (const layer of model.layers) {
    if (layer === inputLayer) continue;
    // The models exported are cut from a freshly loaded base: each layer applied once. A layer applied
    // twice (shared weights) would make inboundNodes[0] ambiguous: refused rather than guessed.
    if (layer.inboundNodes.length !== 1) throw new UnsupportedLayerError(layer.name, `${layer.getClassName()} applied ${layer.inboundNodes.length} times`);
    const cfg = layer.getConfig() as Record<string, unknown>;
    if (cfg.dataFormat !== undefined && cfg.dataFormat !== "channelsLast") throw new UnsupportedLayerError(layer.name, `data format ${String(cfg.dataFormat)}`);
    const inputs = (layer.inboundNodes[0]?.inboundLayers ?? []).map((l) => tensor(l.name));
    convert(out, layer, inputs);
  }
  const outputRank = model.outputs[0]?.shape.length;
  if (outputRank === 2)
    node(out, "Identity", [last], [outputName]); // pooled in the graph already
  else if (options.pooled) node(out, "ReduceMean", [last], [outputName], { axes: [2, 3], keepdims: 0 });
  else node(out, "Transpose", [last], [outputName], { perm: [0, 2, 3, 1] });
  const outputs = [{ name: outputName, dims: ["N", ...outputDims(model, options.pooled)] as (number | string)[] }];
  if (options.similarity) {
    const { layer, means, output } = options.similarity;
    const dim = model.getLayer(layer).outputShape.at(-1) as number;
    if (means.length % dim !== 0) throw new Error(`${means.length} numbers are not rows of the ${dim} features ${layer} gives`);
    const transposed = tf.tidy(() => tf.transpose(tf.tensor2d(means, [means.length / dim, dim])));
    node(out, "LpNormalization", [tensor(layer)], ["similarity:unit"], { axis: 1, p: 2 });
    node(out, "MatMul", ["similarity:unit", constant(out, "similarity/means", transposed)], ["similarity:cosines"]);
    node(out, "ReduceMax", ["similarity:cosines"], [output], { axes: [1], keepdims: 0 });
    transposed.dispose();
    outputs.push({ name: output, dims: ["N"] });
  }

  const shapeOf = (dims: (number | string)[], elemType: number = proto.TensorProto.DataType.FLOAT) => ({
    tensorType: {
      elemType,
      shape: { dim: dims.map((d) => (typeof d === "string" ? { dimParam: d } : { dimValue: d })) },
    },
  });
  const modelProto: onnx.IModelProto = {
    irVersion: 7,
    producerName: "edgetune",
    opsetImport: [{ domain: "", version: OPSET }],
    ...(options.docString ? { docString: options.docString } : {}),
    metadataProps: Object.entries(options.metadata ?? {}).map(([key, value]) => ({ key, value })),
    graph: {
      name: model.name,
      node: out.nodes,
      initializer: out.initializers,
      input: [{ name: inputName, type: shapeOf(["N", options.size, options.size, 3], options.uint8 ? proto.TensorProto.DataType.UINT8 : undefined) }],
      output: outputs.map((o) => ({ name: o.name, type: shapeOf(o.dims) })),
    },
  };
  return proto.ModelProto.encode(modelProto).finish();
}

/** The output's shape after the batch: [C] pooled, or the maps' [h, w, C]. */
function outputDims(model: tf.LayersModel, pooled: boolean): number[] {
  const shape = (model.outputs[0]?.shape ?? []).slice(1).map((d) => d ?? -1);
  return pooled ? shape.slice(-1) : shape;
}

const tensor = (layer: string) => `layer:${layer}`;

function convert(out: Built, layer: tf.layers.Layer, inputs: string[]): void {
  const cls = layer.getClassName();
  // tfjs serialises layer configs with camelCase keys (poolSize, useBias, maxValue…).
  const cfg = layer.getConfig() as Record<string, unknown>;
  const name = tensor(layer.name);
  const [x] = inputs as [string];
  const weights = layer.getWeights();
  switch (cls) {
    case "Conv2D":
    case "DepthwiseConv2D": {
      const [kernel, bias] = weights as [tf.Tensor4D, tf.Tensor1D | undefined];
      const [kh, kw, cin, m] = kernel.shape;
      // Conv2D [kh, kw, in, out] → [out, in, kh, kw]; depthwise [kh, kw, C, M] → [C·M, 1, kh, kw] (output c·M + m).
      const w = tf.tidy(() =>
        cls === "Conv2D"
          ? tf.transpose(kernel, [3, 2, 0, 1])
          : tf.reshape(tf.transpose(tf.reshape(kernel, [kh, kw, cin * m]), [2, 0, 1]), [cin * m, 1, kh, kw]),
      );
      const convInputs = [x, constant(out, `${name}/W`, w)];
      w.dispose();
      if (cfg.useBias !== false && bias) convInputs.push(constant(out, `${name}/B`, bias));
      const activation = (cfg.activation as string | undefined) ?? "linear";
      const convOut = activation === "linear" ? name : `${name}/pre`;
      node(out, "Conv", convInputs, [convOut], {
        kernel_shape: [kh, kw],
        strides: pair(cfg.strides),
        dilations: pair(cfg.dilationRate),
        group: cls === "Conv2D" ? 1 : cin,
        auto_pad: padding(layer.name, cfg.padding),
      });
      if (activation !== "linear") activate(out, layer.name, activation, convOut, name);
      return;
    }
    case "BatchNormalization": {
      const axis = cfg.axis as number | number[];
      if (!(axis === -1 || axis === 3 || (Array.isArray(axis) && (axis[0] === -1 || axis[0] === 3))))
        throw new UnsupportedLayerError(layer.name, `BatchNormalization on axis ${axis}`);
      const byName = new Map(layer.weights.map((v, i) => [v.originalName.split("/").at(-1) as string, weights[i] as tf.Tensor]));
      const mean = byName.get("moving_mean") as tf.Tensor;
      const ones = tf.onesLike(mean);
      const zeros = tf.zerosLike(mean);
      node(
        out,
        "BatchNormalization",
        [
          x,
          constant(out, `${name}/scale`, byName.get("gamma") ?? ones),
          constant(out, `${name}/B`, byName.get("beta") ?? zeros),
          constant(out, `${name}/mean`, mean),
          constant(out, `${name}/var`, byName.get("moving_variance") as tf.Tensor),
        ],
        [name],
        { epsilon: (cfg.epsilon as number | undefined) ?? 1e-3 },
      );
      ones.dispose();
      zeros.dispose();
      return;
    }
    case "Activation":
      activate(out, layer.name, cfg.activation as string, x, name);
      return;
    case "ReLU": {
      const max = cfg.maxValue as number | null | undefined;
      if (max == null) node(out, "Relu", [x], [name]);
      else clip(out, name, x, 0, max);
      return;
    }
    case "LeakyReLU":
      node(out, "LeakyRelu", [x], [name], { alpha: (cfg.alpha as number | undefined) ?? 0.3 });
      return;
    case "ZeroPadding2D": {
      const [[t, b], [l, r]] = cfg.padding as [[number, number], [number, number]];
      node(out, "Pad", [x, int64(out, `${name}/pads`, [0, 0, t, l, 0, 0, b, r])], [name], { mode: "constant" });
      return;
    }
    case "MaxPooling2D":
    case "AveragePooling2D":
      node(out, cls === "MaxPooling2D" ? "MaxPool" : "AveragePool", [x], [name], {
        kernel_shape: pair(cfg.poolSize),
        strides: pair(cfg.strides ?? cfg.poolSize),
        auto_pad: padding(layer.name, cfg.padding),
        // TF's SAME average pooling divides by the pixels inside the image only.
        ...(cls === "AveragePooling2D" ? { count_include_pad: 0 } : {}),
      });
      return;
    case "Add":
      if (inputs.length === 2) node(out, "Add", inputs, [name]);
      else node(out, "Sum", inputs, [name]);
      return;
    case "Dropout":
      node(out, "Identity", [x], [name]);
      return;
    // The classifier's head on the pooled [N, C] features: Gemm (x · W + B), then its activation.
    case "Dense": {
      const [kernel, bias] = weights as [tf.Tensor2D, tf.Tensor1D | undefined];
      if ((layer.outputShape as unknown[]).length !== 2) throw new UnsupportedLayerError(layer.name, "Dense on more than one axis");
      const activation = (cfg.activation as string | undefined) ?? "linear";
      const pre = activation === "linear" ? name : `${name}/pre`;
      const gemmInputs = [x, constant(out, `${name}/W`, kernel)];
      if (cfg.useBias !== false && bias) gemmInputs.push(constant(out, `${name}/B`, bias));
      node(out, "Gemm", gemmInputs, [pre]);
      if (activation === "softmax") node(out, "Softmax", [pre], [name], { axis: -1 });
      else if (activation !== "linear") activate(out, layer.name, activation, pre, name);
      return;
    }
    // Features from several layers (features/extract.ts extractorFor): each map pooled to [N, C],
    // the vectors concatenated. Channels are axis 1 in NCHW as in the pooled [N, C].
    case "GlobalAveragePooling2D":
      node(out, "ReduceMean", [x], [name], { axes: [2, 3], keepdims: 0 });
      return;
    case "Concatenate": {
      const axis = (cfg.axis as number | undefined) ?? -1;
      const rank = (layer.outputShape as unknown[]).length;
      if (rank !== 2 || (axis !== -1 && axis !== 1)) throw new UnsupportedLayerError(layer.name, `concatenation on axis ${axis} of rank ${rank}`);
      node(out, "Concat", inputs, [name], { axis: 1 });
      return;
    }
    default:
      throw new UnsupportedLayerError(layer.name, cls);
  }
}

function activate(out: Built, layer: string, activation: string, x: string, y: string): void {
  if (activation === "linear") node(out, "Identity", [x], [y]);
  else if (activation === "relu") node(out, "Relu", [x], [y]);
  else if (activation === "relu6") clip(out, y, x, 0, 6);
  else if (activation === "sigmoid") node(out, "Sigmoid", [x], [y]);
  else throw new UnsupportedLayerError(layer, `activation ${activation}`);
}

function clip(out: Built, y: string, x: string, min: number, max: number): void {
  node(out, "Clip", [x, scalar(out, `${y}/min`, min), scalar(out, `${y}/max`, max)], [y]);
}

function padding(layer: string, p: unknown): string {
  // TF's SAME puts the odd pixel of padding at the bottom and right: ONNX's SAME_UPPER.
  if (p === "same") return "SAME_UPPER";
  if (p === "valid") return "VALID";
  throw new UnsupportedLayerError(layer, `padding ${String(p)}`);
}

/** Keras configs give sizes as [h, w] or as one number for both. */
function pair(v: unknown): number[] {
  if (Array.isArray(v)) return v as number[];
  const n = (v as number | null | undefined) ?? 1;
  return [n, n];
}

type Attribute = number | number[] | string;

function node(out: Built, opType: string, input: string[], output: string[], attributes: Record<string, Attribute> = {}): void {
  out.nodes.push({
    opType,
    input,
    output,
    name: `${output[0]}/${opType}`,
    attribute: Object.entries(attributes).map(([name, v]) =>
      typeof v === "string"
        ? { name, type: proto.AttributeProto.AttributeType.STRING, s: new TextEncoder().encode(v) }
        : Array.isArray(v)
          ? { name, type: proto.AttributeProto.AttributeType.INTS, ints: v }
          : Number.isInteger(v) && name !== "alpha" && name !== "epsilon"
            ? { name, type: proto.AttributeProto.AttributeType.INT, i: v }
            : { name, type: proto.AttributeProto.AttributeType.FLOAT, f: v },
    ),
  });
}

function constant(out: Built, name: string, t: tf.Tensor): string {
  out.initializers.push({
    name,
    dims: t.shape,
    dataType: proto.TensorProto.DataType.FLOAT,
    rawData: new Uint8Array((t.dataSync() as Float32Array).slice().buffer),
  });
  return name;
}

function scalar(out: Built, name: string, v: number): string {
  out.initializers.push({ name, dims: [], dataType: proto.TensorProto.DataType.FLOAT, rawData: new Uint8Array(Float32Array.of(v).buffer) });
  return name;
}

function int64(out: Built, name: string, values: number[]): string {
  out.initializers.push({ name, dims: [values.length], dataType: proto.TensorProto.DataType.INT64, int64Data: values });
  return name;
}
