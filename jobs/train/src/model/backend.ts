import { createRequire } from "node:module";
import * as tf from "@tensorflow/tfjs";
import "@tensorflow/tfjs-backend-wasm";
import { restoreIsNullOrUndefined } from "./node-compat.ts";
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
  selected ??= chooseBackend(env.EDGETUNE_BACKEND);
  return selected;
}

/** The native packages, in order of preference; optional: present only in the GPU image (or where a user installed them). */
export const NATIVE_PACKAGES = ["@tensorflow/tfjs-node-gpu", "@tensorflow/tfjs-node"] as const;

/**
 * Chooses and initialises the backend. `load` imports a native package (tests pass a stand-in; a
 * native package registers the "tensorflow" backend when imported).
 */
export async function chooseBackend(forced: string | undefined, load: (pkg: string) => Promise<unknown> = (pkg) => import(pkg)): Promise<BackendInfo> {
  const tried: string[] = [];
  if (forced !== "wasm") {
    for (const pkg of NATIVE_PACKAGES) {
      try {
        restoreIsNullOrUndefined(); // before tfjs-node first runs an op, see node-compat.ts
        await load(pkg);
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
