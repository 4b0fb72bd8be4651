import { type ChildProcess, spawn } from "node:child_process";
import { jobEnvironment } from "../../infra/local/job-env.ts";
import type { LocalS3 } from "../../infra/local/s3-server.ts";

/** The training job as the Batch container runs it — `edgetune train …` in its own process — for kill tests. */
export function spawnTrainJob(s3: LocalS3, args: string[], env: Record<string, string> = {}): ChildProcess {
  return spawn(process.execPath, ["jobs/train/cli.ts", "train", ...args, "--json"], {
    env: jobEnvironment(s3.config, env),
    stdio: "ignore",
  });
}

/** SIGKILLs `child` (like a spot reclaim) as soon as `ready` holds for the keys under `prefix`. */
export function killWhen(s3: LocalS3, child: ChildProcess, prefix: string, ready: (keys: string[]) => boolean): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setInterval(async () => {
      const keys: string[] = [];
      for await (const o of s3.store.list(prefix)) keys.push(o.key);
      if (ready(keys)) {
        clearInterval(timer);
        child.kill("SIGKILL");
        child.once("exit", () => resolve());
      }
    }, 50);
    child.once("exit", () => {
      clearInterval(timer);
      if (child.signalCode !== "SIGKILL") reject(new Error("the job finished before it could be killed"));
    });
  });
}
