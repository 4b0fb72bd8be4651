/**
 * Gradient kernels that `@tensorflow/tfjs-backend-wasm` 4.22 does not have, so that fine-tuning
 * (strategy 2) runs on wasm: `Conv2DBackpropFilter`, `DepthwiseConv2dNativeBackpropFilter` and
 * `DepthwiseConv2dNativeBackpropInput`.
 *
 * Written here because tfjs lacks them (see ARCHITECTURE.md), small on purpose and tested against
 * tfjs-backend-cpu's reference kernels in `wasm-grad-kernels.test.ts`. Each is expressed with ops the
 * wasm backend runs natively, one filter tap at a time:
 *   - a filter gradient is, per tap (kh, kw), the strided window of x that the tap saw, contracted
 *     with dy: a matmul for Conv2D (a 1×1 conv is exactly one), an elementwise product summed over
 *     batch and space for depthwise;
 *   - the depthwise input gradient is, per tap, dy scaled by that tap's weights, dilated by the
 *     stride and shifted back to where the tap read its input.
 * Ops run inside a kernel are not recorded on the gradient tape (the engine records at kernel depth 0).
 * Dilated convolutions and channel multipliers > 1 are not needed by MobileNets and are rejected.
 */
import * as tf from "@tensorflow/tfjs";

type PadAttr = "same" | "valid" | number | tf.backend_util.ExplicitPadding;
interface ConvAttrs {
  strides: number | [number, number];
  pad: PadAttr;
  dimRoundingMode?: "floor" | "round" | "ceil";
  dilations?: number | [number, number];
}

let registered = false;

export function registerWasmGradientKernels(): void {
  if (registered) return;
  registered = true;
  const backendName = "wasm";
  tf.registerKernel({
    kernelName: tf.Conv2DBackpropFilter,
    backendName,
    kernelFunc: ({ inputs, attrs }) => {
      const { x, dy } = inputs as { x: tf.Tensor4D; dy: tf.Tensor4D };
      const a = attrs as unknown as ConvAttrs & { filterShape: [number, number, number, number]; dataFormat?: string };
      if (a.dataFormat && a.dataFormat !== "NHWC") throw new Error("Conv2DBackpropFilter (wasm): only NHWC is supported");
      return conv2dBackpropFilter(x, dy, a.filterShape, a);
    },
  });
  tf.registerKernel({
    kernelName: tf.DepthwiseConv2dNativeBackpropFilter,
    backendName,
    kernelFunc: ({ inputs, attrs }) => {
      const { x, dy } = inputs as { x: tf.Tensor4D; dy: tf.Tensor4D };
      const a = attrs as unknown as ConvAttrs & { filterShape: [number, number, number, number] };
      return depthwiseBackpropFilter(x, dy, a.filterShape, a);
    },
  });
  tf.registerKernel({
    kernelName: tf.DepthwiseConv2dNativeBackpropInput,
    backendName,
    kernelFunc: ({ inputs, attrs }) => {
      const { dy, filter } = inputs as { dy: tf.Tensor4D; filter: tf.Tensor4D };
      const a = attrs as unknown as ConvAttrs & { inputShape: [number, number, number, number] };
      return depthwiseBackpropInput(dy, filter, a.inputShape, a);
    },
  });
}

function convInfo(xShape: number[], filterShape: number[], a: ConvAttrs, depthwise: boolean) {
  const dil = a.dilations ?? 1;
  if (dil !== 1 && !(Array.isArray(dil) && dil[0] === 1 && dil[1] === 1)) throw new Error("wasm gradient kernels: dilated convolutions are not supported");
  return tf.backend_util.computeConv2DInfo(
    xShape as [number, number, number, number],
    filterShape as [number, number, number, number],
    a.strides,
    1,
    a.pad,
    a.dimRoundingMode,
    depthwise,
  );
}

/** The window of `x` read by filter tap (kh, kw): shape [batch, outH, outW, channels], zero outside x. */
function tapWindow(x: tf.Tensor4D, info: tf.backend_util.Conv2DInfo, kh: number, kw: number): tf.Tensor4D {
  const { strideHeight: sh, strideWidth: sw, outHeight, outWidth, padInfo } = info;
  const [b, h, w, c] = x.shape;
  const top = kh - padInfo.top;
  const left = kw - padInfo.left;
  const lastRow = top + (outHeight - 1) * sh;
  const lastCol = left + (outWidth - 1) * sw;
  const padTop = Math.max(0, -top);
  const padLeft = Math.max(0, -left);
  const padBottom = Math.max(0, lastRow - (h - 1));
  const padRight = Math.max(0, lastCol - (w - 1));
  const padded =
    padTop || padLeft || padBottom || padRight
      ? tf.pad(x, [
          [0, 0],
          [padTop, padBottom],
          [padLeft, padRight],
          [0, 0],
        ])
      : x;
  const begin = [0, top + padTop, left + padLeft, 0];
  const end = [b, lastRow + padTop + 1, lastCol + padLeft + 1, c];
  return tf.stridedSlice(padded, begin, end, [1, sh, sw, 1]) as tf.Tensor4D;
}

function conv2dBackpropFilter(x: tf.Tensor4D, dy: tf.Tensor4D, filterShape: [number, number, number, number], a: ConvAttrs): tf.Tensor {
  const info = convInfo(x.shape, filterShape, a, false);
  const [kH, kW, inC, outC] = filterShape;
  const dy2 = tf.reshape(dy, [-1, outC]) as tf.Tensor2D;
  const taps: tf.Tensor[] = [];
  for (let kh = 0; kh < kH; kh++) {
    for (let kw = 0; kw < kW; kw++) {
      const win = tf.reshape(tapWindow(x, info, kh, kw), [-1, inC]) as tf.Tensor2D;
      taps.push(tf.matMul(win, dy2, true, false));
    }
  }
  return tf.reshape(tf.stack(taps), filterShape);
}

function depthwiseBackpropFilter(x: tf.Tensor4D, dy: tf.Tensor4D, filterShape: [number, number, number, number], a: ConvAttrs): tf.Tensor {
  const [kH, kW, inC, mult] = filterShape;
  if (mult !== 1) throw new Error("DepthwiseConv2dNativeBackpropFilter (wasm): channel multiplier must be 1");
  const info = convInfo(x.shape, filterShape, a, true);
  const taps: tf.Tensor[] = [];
  for (let kh = 0; kh < kH; kh++) {
    for (let kw = 0; kw < kW; kw++) taps.push(tf.sum(tf.mul(tapWindow(x, info, kh, kw), dy), [0, 1, 2]));
  }
  return tf.reshape(tf.stack(taps), [kH, kW, inC, 1]);
}

function depthwiseBackpropInput(dy: tf.Tensor4D, filter: tf.Tensor4D, inputShape: [number, number, number, number], a: ConvAttrs): tf.Tensor {
  const [kH, kW, inC, mult] = filter.shape;
  if (mult !== 1) throw new Error("DepthwiseConv2dNativeBackpropInput (wasm): channel multiplier must be 1");
  const info = convInfo(inputShape, filter.shape, a, true);
  const { strideHeight: sh, strideWidth: sw, padInfo } = info;
  const [b, inH, inW] = inputShape;
  const [, outH, outW] = dy.shape;
  const w = tf.reshape(filter, [kH, kW, inC]);
  let dx: tf.Tensor4D = tf.zeros(inputShape);
  for (let kh = 0; kh < kH; kh++) {
    for (let kw = 0; kw < kW; kw++) {
      const tapW = tf.reshape(tf.slice(w, [kh, kw, 0], [1, 1, inC]), [inC]);
      let contrib = tf.mul(dy, tapW) as tf.Tensor4D;
      if (sh > 1 || sw > 1) {
        // Dilate: output position (oh, ow) came from input row oh*sh + kh - padTop.
        contrib = tf.reshape(
          tf.pad(tf.reshape(contrib, [b, outH, 1, outW, 1, inC]), [
            [0, 0],
            [0, 0],
            [0, sh - 1],
            [0, 0],
            [0, sw - 1],
            [0, 0],
          ]),
          [b, outH * sh, outW * sw, inC],
        );
      }
      dx = tf.add(dx, shiftInto(contrib, kh - padInfo.top, kw - padInfo.left, inH, inW));
    }
  }
  return dx;
}

/** Places z so that z[i, j] lands at [i + dr, j + dc], cropped or zero-filled to [h, w]. */
function shiftInto(z: tf.Tensor4D, dr: number, dc: number, h: number, w: number): tf.Tensor4D {
  const [, zh, zw] = z.shape;
  const before = [Math.max(0, dr), Math.max(0, dc)] as const;
  const start = [Math.max(0, -dr), Math.max(0, -dc)] as const;
  const after = [Math.max(0, h - (zh - start[0]) - before[0]), Math.max(0, w - (zw - start[1]) - before[1])] as const;
  const padded = tf.pad(z, [
    [0, 0],
    [before[0], after[0]],
    [before[1], after[1]],
    [0, 0],
  ]);
  return tf.slice(padded, [0, start[0], start[1], 0], [-1, h, w, -1]);
}
