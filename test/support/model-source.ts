import { sha256Hex } from "#shared/hash.ts";
import type { ConditionalResult, ModelSource } from "../../functions/edge/src/model/source.ts";

/**
 * An in-memory bucket for the edge's model registry: counts GETs by key, can fail every request like an
 * S3 outage, and can hold the first GET of a key until the test lets it go (to order concurrent loads).
 */
export function fakeSource() {
  const objects = new Map<string, Uint8Array>();
  const state = { gets: 0, down: false, keys: [] as string[] };
  const gates = new Map<string, Promise<void>>();
  const source: ModelSource = {
    async *listFolders() {},
    async get(key) {
      return (await source.getIfChanged(key)).bytes ?? null;
    },
    async getIfChanged(key, etag): Promise<ConditionalResult> {
      state.gets++;
      state.keys.push(key);
      const gate = gates.get(key);
      if (gate) {
        gates.delete(key);
        await gate;
      }
      if (state.down) throw new Error("S3 answered 500 InternalError");
      const bytes = objects.get(key);
      if (!bytes) return { status: 404 };
      const tag = `"${(await sha256Hex(bytes)).slice(0, 16)}"`;
      return tag === etag ? { status: 304, etag } : { status: 200, bytes, etag: tag };
    },
  };
  const put = (key: string, value: unknown) => objects.set(key, new TextEncoder().encode(JSON.stringify(value)));
  const getsOf = (key: string) => state.keys.filter((k) => k === key).length;
  /** Holds the next GET of `key` until the returned function is called. */
  const holdNext = (key: string): (() => void) => {
    let open = () => {};
    gates.set(key, new Promise<void>((resolve) => (open = resolve)));
    return () => open();
  };
  return { source, state, put, objects, getsOf, holdNext };
}
