/**
 * Gradient kernels that `@tensorflow/tfjs-backend-wasm` 4.22 does not have, so that fine-tuning
 * (strategy 2) runs on wasm: `Conv2DBackpropFilter`, `DepthwiseConv2dNativeBackpropFilter` and
 * `DepthwiseConv2dNativeBackpropInput`.
 *
 * Written here because tfjs lacks them (see ARCHITECTURE.md), small on purpose and tested against
 * tfjs-backend-cpu's reference kernels in `wasm-grad-kernels.test.ts`:
 *   - the Conv2D filter gradient is, per tap (kh, kw), the strided window of x that the tap saw
 *     contracted with dy: one matmul for a 1×1 convolution (most of MobileNet), one per tap otherwise;
 *   - the depthwise filter and input gradients are plain loops over the flat arrays (see below);
 *   - two stock wasm kernels are wrapped because they are 10–20× slow on what backprop asks of them:
 *     BatchMatMul with transposed operands, and Conv2DBackpropInput of 1×1 convolutions.
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
  // wasm's BatchMatMul with transposeA/transposeB set is 10–20× slower than an explicit transpose
  // followed by a plain matmul (measured: 117 ms vs 6 ms for 960×576 · 576×160). Every matmul gradient
  // sets one of the flags, so this one wrapper speeds up all of backprop on wasm.
  const stockMatMul = tf.getKernel(tf.BatchMatMul, backendName);
  if (stockMatMul) {
    tf.unregisterKernel(tf.BatchMatMul, backendName);
    tf.registerKernel({
      kernelName: tf.BatchMatMul,
      backendName,
      kernelFunc: (args) => {
        const { a, b } = args.inputs as { a: tf.Tensor; b: tf.Tensor };
        const { transposeA, transposeB } = args.attrs as { transposeA: boolean; transposeB: boolean };
        if (!transposeA && !transposeB) return stockMatMul.kernelFunc(args) as tf.TensorInfo;
        const swapLast = (t: tf.Tensor) =>
          tf.transpose(
            t,
            [...t.shape.keys()].map((i, _, all) => (i < all.length - 2 ? i : i === all.length - 2 ? all.length - 1 : all.length - 2)),
          );
        const at = transposeA ? swapLast(a) : a;
        const bt = transposeB ? swapLast(b) : b;
        const result = stockMatMul.kernelFunc({
          ...args,
          inputs: { a: at, b: bt },
          attrs: { ...args.attrs, transposeA: false, transposeB: false },
        }) as tf.TensorInfo;
        if (at !== a) at.dispose();
        if (bt !== b) bt.dispose();
        return result;
      },
    });
  }
  // wasm's own Conv2DBackpropInput is a direct loop that is slow for 1×1 convolutions, which are most of
  // MobileNet's parameters; route those to one matmul and keep the original for everything else.
  const stockBackpropInput = tf.getKernel(tf.Conv2DBackpropInput, backendName);
  if (stockBackpropInput) {
    tf.unregisterKernel(tf.Conv2DBackpropInput, backendName);
    tf.registerKernel({
      kernelName: tf.Conv2DBackpropInput,
      backendName,
      kernelFunc: (args) => {
        const { dy, filter } = args.inputs as { dy: tf.Tensor4D; filter: tf.Tensor4D };
        const a = args.attrs as unknown as ConvAttrs & { inputShape: [number, number, number, number]; dataFormat?: string };
        if (isPointwise(filter.shape, a) && (!a.dataFormat || a.dataFormat === "NHWC")) {
          const [, , inC, outC] = filter.shape;
          const dx = tf.matMul(tf.reshape(dy, [-1, outC]), tf.reshape(filter, [inC, outC]), false, true);
          return tf.reshape(dx, a.inputShape);
        }
        return stockBackpropInput.kernelFunc(args) as tf.TensorInfo;
      },
    });
  }
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
  // Plain slices and reshapes: wasm's StridedSlice is several times slower than Slice.
  const rowStart = top + padTop;
  const colStart = left + padLeft;
  if (sh === 1 && sw === 1) return tf.slice(padded, [0, rowStart, colStart, 0], [b, outHeight, outWidth, c]);
  // Strided: take outHeight·sh rows (zero-padding the tail if needed), fold the stride into its own
  // axis and keep phase 0 of it.
  const needRows = rowStart + outHeight * sh - padded.shape[1];
  const needCols = colStart + outWidth * sw - padded.shape[2];
  const tail =
    needRows > 0 || needCols > 0
      ? tf.pad(padded, [
          [0, 0],
          [0, Math.max(0, needRows)],
          [0, Math.max(0, needCols)],
          [0, 0],
        ])
      : padded;
  const window = tf.slice(tail, [0, rowStart, colStart, 0], [b, outHeight * sh, outWidth * sw, c]);
  const phased = tf.slice(tf.reshape(window, [b, outHeight, sh, outWidth, sw, c]), [0, 0, 0, 0, 0, 0], [b, outHeight, 1, outWidth, 1, c]);
  return tf.reshape(phased, [b, outHeight, outWidth, c]);
}

/** A 1×1, stride-1 convolution without padding: a matmul over channels at every pixel. */
function isPointwise(filterShape: number[], a: ConvAttrs): boolean {
  const strides = Array.isArray(a.strides) ? a.strides : [a.strides, a.strides];
  return filterShape[0] === 1 && filterShape[1] === 1 && strides[0] === 1 && strides[1] === 1 && (a.pad === "valid" || a.pad === "same" || a.pad === 0);
}

function conv2dBackpropFilter(x: tf.Tensor4D, dy: tf.Tensor4D, filterShape: [number, number, number, number], a: ConvAttrs): tf.Tensor {
  if (isPointwise(filterShape, a)) {
    const [, , inC, outC] = filterShape;
    return tf.reshape(tf.matMul(tf.reshape(x, [-1, inC]), tf.reshape(dy, [-1, outC]), true, false), filterShape);
  }
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

// The depthwise gradients are plain loops over the flat arrays: the maps being fine-tuned are small
// (the top blocks of a MobileNet run at 3×3 to 14×14), and wasm's Slice/StridedSlice, which a
// tensor-op formulation needs per filter tap, cost more than the arithmetic (measured: 430 ms vs < 10 ms
// per step of the top blocks at batch 16).
function depthwiseBackpropFilter(x: tf.Tensor4D, dy: tf.Tensor4D, filterShape: [number, number, number, number], a: ConvAttrs): tf.Tensor {
  const [kH, kW, inC, mult] = filterShape;
  if (mult !== 1) throw new Error("DepthwiseConv2dNativeBackpropFilter (wasm): channel multiplier must be 1");
  const xs = x.dataSync() as Float32Array;
  const g = dy.dataSync() as Float32Array;
  const dw = new Float32Array(kH * kW * inC);
  // dW[tap, c] += x[input pixel, c] · dy[output pixel, c]
  forEachTap(x.shape, filterShape, a, (xBase, gBase, wBase) => {
    for (let c = 0; c < inC; c++) dw[wBase + c] = (dw[wBase + c] as number) + (xs[xBase + c] as number) * (g[gBase + c] as number);
  });
  return tf.tensor4d(dw, [kH, kW, inC, 1]);
}

function depthwiseBackpropInput(dy: tf.Tensor4D, filter: tf.Tensor4D, inputShape: [number, number, number, number], a: ConvAttrs): tf.Tensor {
  const [, , inC, mult] = filter.shape;
  if (mult !== 1) throw new Error("DepthwiseConv2dNativeBackpropInput (wasm): channel multiplier must be 1");
  const g = dy.dataSync() as Float32Array;
  const f = filter.dataSync() as Float32Array;
  const dx = new Float32Array(inputShape.reduce((p, d) => p * d, 1));
  // dX[input pixel, c] += W[tap, c] · dy[output pixel, c]
  forEachTap(inputShape, filter.shape, a, (xBase, gBase, wBase) => {
    for (let c = 0; c < inC; c++) dx[xBase + c] = (dx[xBase + c] as number) + (f[wBase + c] as number) * (g[gBase + c] as number);
  });
  return tf.tensor4d(dx, inputShape);
}

/**
 * Calls `visit` for every (output pixel, filter tap) pair of a depthwise convolution whose input pixel
 * lies inside the image, with the flat offsets (channel 0) of the input pixel, the output pixel and
 * the tap's weights.
 */
function forEachTap(
  inputShape: [number, number, number, number],
  filterShape: [number, number, number, number],
  a: ConvAttrs,
  visit: (xBase: number, gBase: number, wBase: number) => void,
): void {
  const info = convInfo(inputShape, filterShape, a, true);
  const { strideHeight: sh, strideWidth: sw, outHeight: oH, outWidth: oW, padInfo } = info;
  const [batch, h, w, inC] = inputShape;
  const [kH, kW] = filterShape;
  for (let n = 0; n < batch; n++) {
    for (let oh = 0; oh < oH; oh++) {
      for (let ow = 0; ow < oW; ow++) {
        const gBase = ((n * oH + oh) * oW + ow) * inC;
        for (let kh = 0; kh < kH; kh++) {
          const ih = oh * sh + kh - padInfo.top;
          if (ih < 0 || ih >= h) continue;
          for (let kw = 0; kw < kW; kw++) {
            const iw = ow * sw + kw - padInfo.left;
            if (iw < 0 || iw >= w) continue;
            visit(((n * h + ih) * w + iw) * inC, gBase, (kh * kW + kw) * inC);
          }
        }
      }
    }
  }
}
