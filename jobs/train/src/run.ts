import type { ObjectStore } from "#shared/s3/store.ts";
import type { Logger } from "./log.ts";

/**
 * What every stage of a training run is handed: the bucket, the logger, and `stage`, which times a
 * step, logs it when it ends and records it for the report (`report.json` → `phases`).
 */
export interface RunContext {
  readonly store: ObjectStore;
  readonly log: Logger;
  readonly phases: PhaseRecord[];
  stage<T>(name: string, run: () => Promise<T>, detail?: (result: T) => Record<string, unknown>): Promise<T>;
}

export interface PhaseRecord {
  name: string;
  seconds: number;
  detail?: Record<string, unknown>;
}

/** `onStage` hears each stage's name as it starts (the run's status record). */
export function runContext(store: ObjectStore, log: Logger, onStage: (name: string) => void = () => {}): RunContext {
  const phases: PhaseRecord[] = [];
  return {
    store,
    log,
    phases,
    async stage(name, run, detail) {
      onStage(name);
      const t0 = performance.now();
      const result = await run();
      const seconds = (performance.now() - t0) / 1000;
      const fields = detail?.(result);
      phases.push({ name, seconds, detail: fields });
      log.info(`${name} done`, { seconds: Number(seconds.toFixed(2)), ...fields });
      return result;
    },
  };
}
