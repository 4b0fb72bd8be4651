import type { VerifiedBytesCache } from "../../../../shared/artifacts.ts";

/**
 * Verified model bytes in the Workers Cache API, keyed by sha256, so every isolate of a location after
 * the first loads a model without fetching it from the bucket (versions are immutable; the key is the
 * content). Each hit is hashed again before use (shared/artifacts.ts). The Cache API stores nothing for
 * a Worker served from *.workers.dev (add a custom-domain route to benefit): there, and where `caches`
 * is absent, this is simply a miss every time.
 */
export function workersCache(): VerifiedBytesCache | undefined {
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
