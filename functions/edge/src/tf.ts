/**
 * TensorFlow.js on the wasm backend (SIMD) inside workerd.
 *
 * Workers may not compile WebAssembly from bytes, so tfjs-backend-wasm's stock init (which fetches
 * and compiles the .wasm) hangs there. Instead the .wasm is imported as a module — wrangler turns it
 * into a precompiled `WebAssembly.Module` — and the "wasm" backend is registered again with an
 * emscripten `instantiateWasm` hook that instantiates that module. This mirrors the private `init()`
 * of tfjs-backend-wasm 4.22.0 (backend_wasm.ts), which is why tfjs is pinned exactly in package.json.
 * Threads are impossible in Workers (no SharedArrayBuffer across workers): single-threaded SIMD.
 */

import { BackendWasm } from "@tensorflow/tfjs-backend-wasm";
import wasmFactory from "@tensorflow/tfjs-backend-wasm/wasm-out/tfjs-backend-wasm.js";
import simdModule from "@tensorflow/tfjs-backend-wasm/wasm-out/tfjs-backend-wasm-simd.wasm";
import * as tf from "@tensorflow/tfjs-core";
import { instantiateTracked } from "./memory.ts";

interface EmscriptenModule {
  cwrap(name: string, ret: string | null, args: string[]): (...args: number[]) => number;
  tfjs?: Record<string, unknown>;
}

let ready: Promise<void> | undefined;

async function createBackend(): Promise<BackendWasm> {
  const module = (await (wasmFactory as unknown as (config: object) => Promise<EmscriptenModule>)({
    instantiateWasm: instantiateTracked("tfjs", simdModule),
  })) as EmscriptenModule;
  module.tfjs = {
    init: module.cwrap("init", null, []),
    initWithThreadsCount: module.cwrap("init_with_threads_count", null, ["number"]),
    getThreadsCount: module.cwrap("get_threads_count", "number", []),
    registerTensor: module.cwrap("register_tensor", null, ["number", "number", "number"]),
    disposeData: module.cwrap("dispose_data", null, ["number"]),
    dispose: module.cwrap("dispose", null, []),
  };
  return new BackendWasm(module as unknown as ConstructorParameters<typeof BackendWasm>[0]);
}

export function initTf(): Promise<void> {
  ready ??= (async () => {
    tf.env().set("PROD", true);
    // Built here rather than inside the registry's factory, whose errors tfjs swallows.
    const backend = await createBackend();
    tf.removeBackend("wasm");
    tf.registerBackend("wasm", () => backend, 3);
    if (!(await tf.setBackend("wasm"))) throw new Error("tfjs wasm backend failed to initialise");
  })();
  ready.catch(() => {
    ready = undefined; // let the next request try again
  });
  return ready;
}

export { tf };
