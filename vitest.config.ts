import { existsSync } from "node:fs";
import { join } from "node:path";
import { defineConfig } from "vitest/config";

// No weights are committed: the tests read the reference bases from ../shared/models where it exists
// (CI puts a copy beside the clone), and never download. Without it, a run that names no base gets the
// nsfwjs base that installs with the project, so every test that only needs *a* base still runs.
// EDGETUNE_SHARED moves it (a path that does not exist: the suite as a clean clone runs it).
const models = join(process.env.EDGETUNE_SHARED ?? join(import.meta.dirname, "..", "shared"), "models");
const withShared = existsSync(join(models, "darknet_tiny", "model.json"));

export default defineConfig({
  test: {
    include: ["shared/**/*.test.ts", "jobs/**/*.test.ts", "functions/**/*.test.ts", "infra/**/*.test.ts", "test/**/*.test.ts"],
    // Training and workerd tests are CPU-heavy; on 2 cores running files in parallel only adds contention.
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 300_000,
    // Training locks go stale after 3 heartbeats; tests kill jobs and resume at once. Runs that name no
    // base get darknet-tiny (small and fast) from ../shared, else the nsfwjs one; `auto` is tested on its
    // own, against a local HTTP server (model/auto-base.test.ts).
    env: {
      EDGETUNE_LOCK_HEARTBEAT_MS: "300",
      EDGETUNE_OFFLINE: "1",
      EDGETUNE_DEFAULT_BASE: withShared ? "darknet-tiny" : "nsfwjs-mobilenet-v2",
      ...(withShared ? { EDGETUNE_BASES_DIR: models } : {}),
    },
  },
});
