import type { ObjectStore } from "#shared/s3/store.ts";

/**
 * `real` with a hook around its writes (put and putIfAbsent): for tests where something happens at the
 * moment a given key is written — an attacker rewriting it, an operator acting while a run is under way,
 * a second command starting while the first uploads.
 */
export function aroundWrites(real: ObjectStore, hooks: { before?: (key: string) => Promise<void>; after?: (key: string) => Promise<void> }): ObjectStore {
  const write = async <T>(key: string, w: () => Promise<T>): Promise<T> => {
    await hooks.before?.(key);
    const done = await w();
    await hooks.after?.(key);
    return done;
  };
  return {
    get: (k, o) => real.get(k, o),
    head: (k) => real.head(k),
    list: (p) => real.list(p),
    listFolders: (p) => real.listFolders(p),
    delete: (k) => real.delete(k),
    deleteIfMatch: (k, e) => real.deleteIfMatch(k, e),
    put: (k, b, t, m) => write(k, () => real.put(k, b, t, m)),
    putIfAbsent: (k, b, t) => write(k, () => real.putIfAbsent(k, b, t)),
    putIfMatch: (k, b, e, t) => real.putIfMatch(k, b, e, t),
  };
}
