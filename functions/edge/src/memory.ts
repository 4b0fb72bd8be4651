/**
 * The WebAssembly memories of this isolate — tfjs's and each image decoder's — so /healthz and the
 * memory benchmark can say what the isolate holds. A wasm memory only ever grows: each decoder keeps
 * the size its largest image needed, which is why the pixel limit is a memory decision.
 */
const memories = new Map<string, WebAssembly.Memory>();

/** Finds the module's memory among its exports (or its imports, for modules built with an imported memory). */
export function trackWasmMemory(name: string, exports: WebAssembly.Exports, imports: WebAssembly.Imports = {}): void {
  const candidates = [...Object.values(exports), ...Object.values(imports).flatMap((ns) => Object.values(ns))];
  const memory = candidates.find((v): v is WebAssembly.Memory => v instanceof WebAssembly.Memory);
  if (memory) memories.set(name, memory);
}

/** Bytes of each tracked memory, and their sum. */
export function wasmMemoryBytes(): { total: number; byModule: Record<string, number> } {
  const byModule = Object.fromEntries([...memories].map(([name, m]) => [name, m.buffer.byteLength]));
  return { total: Object.values(byModule).reduce((a, b) => a + b, 0), byModule };
}

/**
 * Emscripten's instantiateWasm hook for a precompiled module (Workers cannot compile wasm from bytes),
 * tracking its memory under `name`.
 */
export function instantiateTracked(name: string, module: WebAssembly.Module) {
  return (imports: WebAssembly.Imports, done: (instance: WebAssembly.Instance, module: WebAssembly.Module) => void) => {
    const instance = new WebAssembly.Instance(module, imports);
    trackWasmMemory(name, instance.exports, imports);
    done(instance, module);
    return instance.exports;
  };
}
