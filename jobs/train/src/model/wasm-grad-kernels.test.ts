import "@tensorflow/tfjs-backend-cpu";
import * as tf from "@tensorflow/tfjs";
import { beforeAll, describe, expect, it } from "vitest";
import { initBackend } from "./backend.ts";

/** The hand-written wasm gradient kernels against tfjs-backend-cpu's reference kernels. */
beforeAll(async () => {
  await initBackend({ EDGETUNE_BACKEND: "wasm" });
});

type Shape4 = [number, number, number, number];
type Case = { name: string; x: Shape4; w: Shape4; stride: number; pad: "same" | "valid"; depthwise: boolean };
const cases: Case[] = [
  { name: "1×1 conv (MobileNet expand/project)", x: [2, 5, 5, 8], w: [1, 1, 8, 6], stride: 1, pad: "valid", depthwise: false },
  { name: "3×3 conv, stride 2, same", x: [2, 7, 6, 3], w: [3, 3, 3, 4], stride: 2, pad: "same", depthwise: false },
  { name: "depthwise 3×3, stride 1, same", x: [2, 6, 6, 5], w: [3, 3, 5, 1], stride: 1, pad: "same", depthwise: true },
  { name: "depthwise 3×3, stride 2, valid", x: [3, 9, 9, 4], w: [3, 3, 4, 1], stride: 2, pad: "valid", depthwise: true },
  { name: "depthwise 3×3, stride 2, same, odd size", x: [1, 7, 5, 3], w: [3, 3, 3, 1], stride: 2, pad: "same", depthwise: true },
];

function gradients(c: Case, backend: string): { dx: Float32Array; dw: Float32Array } {
  tf.setBackend(backend);
  return tf.tidy(() => {
    const x = tf.randomNormal(c.x, 0, 1, "float32", 1) as tf.Tensor4D;
    const w = tf.randomNormal(c.w, 0, 1, "float32", 2) as tf.Tensor4D;
    const f = (xx: tf.Tensor, ww: tf.Tensor) => {
      const y = c.depthwise
        ? tf.depthwiseConv2d(xx as tf.Tensor4D, ww as tf.Tensor4D, c.stride, c.pad)
        : tf.conv2d(xx as tf.Tensor4D, ww as tf.Tensor4D, c.stride, c.pad);
      // A non-uniform upstream gradient, so every output position matters.
      return tf.sum(tf.mul(y, tf.randomNormal(y.shape, 0, 1, "float32", 3)));
    };
    const [dx, dw] = tf.grads(f)([x, w]);
    return { dx: dx?.dataSync() as Float32Array, dw: dw?.dataSync() as Float32Array };
  });
}

describe("wasm gradient kernels", () => {
  for (const c of cases) {
    it(`match the CPU reference: ${c.name}`, async () => {
      const ref = gradients(c, "cpu");
      const got = gradients(c, "wasm");
      expect(tf.getBackend()).toBe("wasm");
      expect(got.dw.length).toBe(ref.dw.length);
      for (let i = 0; i < ref.dw.length; i++) expect(got.dw[i]).toBeCloseTo(ref.dw[i] as number, 3);
      for (let i = 0; i < ref.dx.length; i++) expect(got.dx[i]).toBeCloseTo(ref.dx[i] as number, 3);
    });
  }
});
