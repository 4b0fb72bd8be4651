import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["shared/**/*.test.ts", "jobs/**/*.test.ts", "functions/**/*.test.ts", "infra/**/*.test.ts", "test/**/*.test.ts"],
    // Training and workerd tests are CPU-heavy; on 2 cores running files in parallel only adds contention.
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 300_000,
    // Training locks go stale after 3 heartbeats; tests kill jobs and resume at once.
    // The suite never depends on the internet: runs that do not name a base get the best bundled one
    // (the `auto` default is tested on its own, against a local HTTP server: bases.test.ts).
    env: { EDGETUNE_LOCK_HEARTBEAT_MS: "300", EDGETUNE_DEFAULT_BASE: "darknet-tiny" },
  },
});
