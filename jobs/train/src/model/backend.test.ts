import nodeUtil from "node:util";
import * as tf from "@tensorflow/tfjs";
import { MathBackendCPU } from "@tensorflow/tfjs-backend-cpu";
import { afterEach, describe, expect, it } from "vitest";
import { chooseBackend } from "./backend.ts";
import { restoreIsNullOrUndefined } from "./node-compat.ts";

const util = nodeUtil as unknown as { isNullOrUndefined?: (v: unknown) => boolean };
const nodeHadIt = typeof util.isNullOrUndefined === "function";

afterEach(() => {
  if (!nodeHadIt) delete util.isNullOrUndefined;
  if (tf.findBackend("tensorflow")) tf.removeBackend("tensorflow");
});

/** Stands in for @tensorflow/tfjs-node-gpu 4.22: its kernels call util.isNullOrUndefined, then it registers "tensorflow". */
async function fakeTfjsNodeGpu(pkg: string): Promise<void> {
  if (pkg !== "@tensorflow/tfjs-node-gpu") throw new Error(`Cannot find package '${pkg}'`);
  (nodeUtil as unknown as { isNullOrUndefined: (v: unknown) => boolean }).isNullOrUndefined(undefined);
  tf.registerBackend("tensorflow", () => new MathBackendCPU());
}

describe("backend choice", () => {
  it("puts back util.isNullOrUndefined, which Node 23 removed and tfjs-node 4.22 still calls", () => {
    expect(nodeHadIt).toBe(false); // Node 24, as in the image: remove the shim when this fails
    const plain = {} as { isNullOrUndefined?: (v: unknown) => boolean };
    expect(restoreIsNullOrUndefined(plain)).toBe(true);
    expect([null, undefined, 0, "", false].map((v) => plain.isNullOrUndefined?.(v))).toEqual([true, true, false, false, false]);
    expect(restoreIsNullOrUndefined(plain)).toBe(false);
  });

  it("takes the GPU backend when its package loads, with the Node 24 fix in place before it runs", async () => {
    const info = await chooseBackend(undefined, fakeTfjsNodeGpu);
    expect(info).toMatchObject({ name: "tensorflow", gpu: true, reason: "@tensorflow/tfjs-node-gpu is installed" });
    expect(tf.getBackend()).toBe("tensorflow");
  });

  it("falls back to wasm with SIMD, saying why, when no native package loads; refuses when one was required", async () => {
    const missing = async (pkg: string) => Promise.reject(new Error(`Cannot find package '${pkg}'`));
    const info = await chooseBackend(undefined, missing);
    expect(info).toMatchObject({ name: "wasm", gpu: false });
    expect(info.reason).toMatch(/no native TensorFlow backend installed; wasm with SIMD/);
    await expect(chooseBackend("tensorflow", missing)).rejects.toThrow(
      /EDGETUNE_BACKEND=tensorflow but no native backend loads \(@tensorflow\/tfjs-node-gpu: Cannot find/,
    );
  });
});
