import type { VerifiedBytesCache } from "#shared/artifacts.ts";

/**
 * Where verified model bytes are kept between isolates, keyed by their sha256 (versions are immutable;
 * the key is the content). Every hit is hashed again before use (shared/artifacts.ts): a bad entry costs
 * one fetch from the bucket, never wrong bytes, and the good bytes are put back over it.
 *  - R2 (the `MODEL_CACHE` binding), read-through: the first isolate anywhere that loads a version
 *    fetches it from S3 once and puts it into R2; every later isolate, in any location, reads it from
 *    R2 (no S3 egress, no AWS key involved). ARCHITECTURE.md "The model store at the edge".
 *  - Without the binding, the Workers Cache API: per location, and it stores nothing for a Worker
 *    served from *.workers.dev (there, and where `caches` is absent, every isolate fetches from S3).
 */
export interface ModelCache extends VerifiedBytesCache {
  /** For /healthz: which store, hits (bytes found; each still verified), and puts (bytes fetched from the bucket). */
  stats(): { kind: "r2" | "cache-api"; found: number; stored: number };
}

export function modelCache(env: { MODEL_CACHE?: R2Bucket }): ModelCache | undefined {
  if (env.MODEL_CACHE) return counted("r2", r2Cache(env.MODEL_CACHE));
  const workers = workersCache();
  return workers && counted("cache-api", workers);
}

function r2Cache(bucket: R2Bucket): VerifiedBytesCache {
  const key = (sha256: string) => `sha256/${sha256}`;
  return {
    async get(sha256) {
      const object = await bucket.get(key(sha256));
      return object ? new Uint8Array(await object.arrayBuffer()) : null;
    },
    async put(sha256, bytes) {
      // R2 checks the bytes against `sha256` on write: a put cannot store other bytes under this key.
      await bucket.put(key(sha256), bytes, { sha256, httpMetadata: { contentType: "application/octet-stream" } });
    },
  };
}

function workersCache(): VerifiedBytesCache | undefined {
  if (typeof caches === "undefined") return undefined;
  const url = (sha256: string) => `https://edgetune-model-cache.invalid/sha256/${sha256}`;
  return {
    async get(sha256) {
      const res = await caches.default.match(url(sha256));
      return res ? new Uint8Array(await res.arrayBuffer()) : null;
    },
    async put(sha256, bytes) {
      await caches.default.put(url(sha256), new Response(bytes, { headers: { "cache-control": "public, max-age=31536000, immutable" } }));
    },
  };
}

function counted(kind: "r2" | "cache-api", cache: VerifiedBytesCache): ModelCache {
  const counts = { found: 0, stored: 0 };
  return {
    async get(sha256) {
      const bytes = await cache.get(sha256);
      if (bytes) counts.found++;
      return bytes;
    },
    async put(sha256, bytes) {
      await cache.put(sha256, bytes);
      counts.stored++;
    },
    stats: () => ({ kind, ...counts }),
  };
}
