import { createRequire } from "node:module";
import * as tf from "@tensorflow/tfjs";
import "@tensorflow/tfjs-backend-wasm";
import { registerWasmGradientKernels } from "./wasm-grad-kernels.ts";

/**
 * Picks the fastest TensorFlow.js backend present, in this order:
 *   1. `@tensorflow/tfjs-node-gpu` (the Batch container: CUDA 11.2 + cuDNN 8.1),
 *   2. `@tensorflow/tfjs-node` (libtensorflow on CPU, if someone installed it),
 *   3. `@tensorflow/tfjs-backend-wasm` with SIMD (always installed; single-threaded in Node).
 * Never the pure-JS CPU backend: it is 20–25× slower than wasm (see ARCHITECTURE.md).
 * `EDGETUNE_BACKEND=wasm|tensorflow` forces a choice.
 */
export type BackendName = "tensorflow" | "wasm";
export interface BackendInfo {
  name: BackendName;
  /** Why this one: what was found or missing. */
  reason: string;
  gpu: boolean;
}

let selected: Promise<BackendInfo> | undefined;

export function initBackend(env: Record<string, string | undefined> = process.env): Promise<BackendInfo> {
  selected ??= choose(env.EDGETUNE_BACKEND);
  return selected;
}

async function choose(forced: string | undefined): Promise<BackendInfo> {
  const tried: string[] = [];
  if (forced !== "wasm") {
    for (const pkg of ["@tensorflow/tfjs-node-gpu", "@tensorflow/tfjs-node"]) {
      try {
        // Optional native packages: present only in the GPU container (or where a user installed them).
        await import(pkg);
        if (await tf.setBackend("tensorflow")) {
          return { name: "tensorflow", gpu: pkg.endsWith("-gpu"), reason: `${pkg} is installed` };
        }
      } catch (e) {
        tried.push(`${pkg}: ${e instanceof Error ? (e.message.split("\n")[0] ?? "") : String(e)}`);
      }
    }
    if (forced === "tensorflow") throw new Error(`EDGETUNE_BACKEND=tensorflow but no native backend loads (${tried.join("; ")})`);
  }
  const { setWasmPaths } = await import("@tensorflow/tfjs-backend-wasm");
  setWasmPaths(wasmDir());
  if (!(await tf.setBackend("wasm"))) throw new Error("the tfjs wasm backend failed to initialise");
  registerWasmGradientKernels();
  const simd = await tf.env().getAsync("WASM_HAS_SIMD_SUPPORT");
  const why = forced === "wasm" ? "EDGETUNE_BACKEND=wasm" : "no native TensorFlow backend installed";
  return { name: "wasm", gpu: false, reason: `${why}; wasm${simd ? " with SIMD" : " without SIMD"}, one thread per worker` };
}

/** Folder holding the tfjs wasm binaries, with a trailing slash (emscripten appends the file name). */
export function wasmDir(): string {
  const require = createRequire(import.meta.url);
  const entry = require.resolve("@tensorflow/tfjs-backend-wasm");
  return `${entry.slice(0, entry.lastIndexOf("/dist/") + 6)}`;
}
