import { type ChildProcess, execSync, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

/**
 * The edge worker running in real workerd through `wrangler dev` with the production
 * wrangler.jsonc (no nodejs_compat, the production bundle), pointed at a local S3 server.
 * Used by the worker tests, the end-to-end test and `npm start`.
 */
export interface EdgeWorker {
  url: string;
  apiKey: string;
  /** The wrangler process; it leads a process group that includes workerd. */
  pid: number;
  /** The workerd processes of this dev server (wrangler runs one for its proxy, one for the worker). */
  workerdPids(): number[];
  /** The worker's workerd process (the larger of the two): resident and peak memory in MB, NaN if gone. */
  memoryMb(): { rss: number; peak: number };
  stop(): Promise<void>;
  /** Everything wrangler printed, for debugging a failed start. */
  output(): string;
}

export interface EdgeOptions {
  s3Endpoint: string;
  bucket: string;
  accessKeyId?: string;
  secretAccessKey?: string;
  apiKey?: string;
  pointerTtlSeconds?: number;
  vars?: Record<string, string>;
  port?: number;
  /** wrangler config; default the production one. */
  config?: string;
  /** Where local state (the Cache API among it) is kept; default a fresh folder removed on stop. */
  persistTo?: string;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as { port: number };
      srv.close(() => resolve(port));
    });
    srv.on("error", reject);
  });
}

export async function startEdgeWorker(options: EdgeOptions): Promise<EdgeWorker> {
  // A free port is only free until someone binds it: another process (a parallel test run, a second
  // worker) may take it before workerd does. Only a port we picked ourselves is tried again.
  for (let attempt = 1; ; attempt++) {
    try {
      return await startOnce(options, options.port ?? (await freePort()));
    } catch (e) {
      if (options.port !== undefined || attempt >= 3 || !(e instanceof PortTakenError)) throw e;
    }
  }
}

class PortTakenError extends Error {}

async function startOnce(options: EdgeOptions, port: number): Promise<EdgeWorker> {
  const apiKey = options.apiKey ?? `test-${Math.random().toString(36).slice(2)}`;
  const state = options.persistTo ?? (await mkdtemp(join(tmpdir(), "edgetune-wrangler-")));
  const vars: Record<string, string> = {
    S3_ENDPOINT: options.s3Endpoint,
    S3_BUCKET: options.bucket,
    API_KEYS: apiKey,
    // Locally the one key is also the operator's (the console).
    CONSOLE_API_KEYS: apiKey,
    AWS_ACCESS_KEY_ID: options.accessKeyId ?? "local",
    AWS_SECRET_ACCESS_KEY: options.secretAccessKey ?? "local-secret",
    POINTER_TTL_SECONDS: String(options.pointerTtlSeconds ?? 30),
    ...options.vars,
  };
  const args = [
    "wrangler",
    "dev",
    "--config",
    options.config ?? "functions/edge/wrangler.jsonc",
    "--ip",
    "127.0.0.1",
    "--port",
    String(port),
    "--persist-to",
    state,
    "--show-interactive-dev-session=false",
    "--log-level",
    process.env.EDGETUNE_WRANGLER_LOG ?? "warn",
    ...Object.entries(vars).flatMap(([k, v]) => ["--var", `${k}:${v}`]),
  ];
  const child: ChildProcess = spawn(process.execPath, [join("node_modules", "wrangler", "bin", "wrangler.js"), ...args.slice(1)], {
    env: { ...process.env, CLOUDFLARE_CF_FETCH_ENABLED: "false", WRANGLER_SEND_METRICS: "false", CI: "true" },
    stdio: ["ignore", "pipe", "pipe"],
    // Its own process group: wrangler's bin starts a second node process and workerd, and stopping
    // must take all of them (killing only the bin leaves workerd serving).
    detached: true,
  });
  const killGroup = (signal: NodeJS.Signals) => {
    try {
      process.kill(-(child.pid as number), signal);
    } catch {
      // already gone
    }
  };
  // If this process dies without calling stop(), do not leave workerd behind.
  const onExit = () => killGroup("SIGKILL");
  process.once("exit", onExit);
  let log = "";
  child.stdout?.on("data", (d) => {
    log += d;
  });
  child.stderr?.on("data", (d) => {
    log += d;
  });
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 90_000;
  for (;;) {
    if (child.exitCode !== null) {
      killGroup("SIGKILL");
      if (!options.persistTo) await rm(state, { recursive: true, force: true });
      const Failure = /Address already in use/.test(log) ? PortTakenError : Error;
      throw new Failure(`wrangler dev exited (${child.exitCode}):\n${log}`);
    }
    try {
      const res = await fetch(`${url}/healthz`);
      if (res.ok) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      killGroup("SIGKILL");
      throw new Error(`wrangler dev did not answer within 90 s:\n${log}`);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  const workerdPids = () => {
    const pids: number[] = [];
    for (const line of execSync("ps -eo pid,pgid,comm").toString().split("\n")) {
      const [pid, pgid, comm] = line.trim().split(/\s+/);
      if (Number(pgid) === child.pid && comm === "workerd") pids.push(Number(pid));
    }
    return pids;
  };
  return {
    url,
    apiKey,
    pid: child.pid as number,
    output: () => log,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once("exit", r));
        killGroup("SIGTERM");
        await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
      }
      killGroup("SIGKILL"); // whatever is left of the group (workerd)
      process.off("exit", onExit);
      if (!options.persistTo) await rm(state, { recursive: true, force: true });
    },
    memoryMb() {
      let best = { rss: Number.NaN, peak: Number.NaN };
      for (const pid of workerdPids()) {
        const status = readFileSync(`/proc/${pid}/status`, "utf8");
        const mb = (field: string) => Number(new RegExp(`${field}:\\s+(\\d+)`).exec(status)?.[1]) / 1024;
        if (!(mb("VmRSS") <= best.rss)) best = { rss: mb("VmRSS"), peak: mb("VmHWM") };
      }
      return best;
    },
    workerdPids,
  };
}
