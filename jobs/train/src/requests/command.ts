import { requestOfKey } from "#shared/contracts/request.ts";
import { EdgetuneError } from "#shared/errors.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import type { TrainInput } from "../config.ts";
import type { Logger } from "../log.ts";
import { dispatchNightly, type SubmitTraining } from "../nightly.ts";
import { emit } from "../output.ts";
import { applyRequests } from "./requests.ts";

/**
 * Whether the dispatcher was started for a key under `captures/` (a console request's trigger). Any such
 * key goes to runRequests, never to a dataset upload: the edge's key writes there, and a name the trigger
 * matches but no request has (EventBridge's * spans slashes) must not become a training job.
 */
export const isCapturesKey = (value: string) => value.startsWith("captures/");

/**
 * `edgetune train --dataset captures/<model>/requests/<id>.json`: what the dispatcher runs when a console
 * request is created (the S3 event's key is its `dataset` parameter, as a manifest's is; locally the
 * dispatcher polls and runs the same command). Applies every waiting request of that model and prints
 * one JSON line per outcome. "Train now" goes the way of a push: in AWS Batch the dataset's training job
 * is submitted (nightly.ts); locally a `{"status":"train-requested"}` line asks the local dispatcher, which
 * runs its jobs one at a time, to queue it.
 */
export async function runRequests(store: ObjectStore, input: TrainInput, log: Logger, options: { json: boolean; submit?: SubmitTraining }): Promise<void> {
  // The other options (a local dispatcher's small training flags) go to the runs "train now" submits.
  const { dataset: key, ...trainOptions } = input;
  const named = requestOfKey(key);
  if (!named) {
    // Written with the edge's key alone (the worker names every request it writes): nothing to do, and no failure to alert on.
    log.warn(`${key} is under captures/ but is not named as a console request: ignored (the edge's S3 credentials may have leaked)`);
    return;
  }
  const { model } = named;
  const train = async (dataset: string): Promise<string> => {
    if (!options.submit) {
      emit({ json: true }, { status: "train-requested", dataset }, "");
      return `A training run of dataset ${dataset} is queued (edgetune status ${dataset}).`;
    }
    // tfjs only now, for planning the run (a base not yet in the bucket is imported then); an export starts it itself.
    const { initBackend } = await import("../model/backend.ts");
    await initBackend();
    const r = await dispatchNightly(store, trainOptions, options.submit, log, [dataset]);
    const failed = r.failed[0];
    if (failed) throw new EdgetuneError("submit_failed", failed.reason);
    return `A training run of dataset ${dataset} is submitted (job ${r.submitted[0]?.jobId}); follow it with edgetune status ${dataset}.`;
  };
  const outcomes = await applyRequests(store, model, { log, train });
  for (const o of outcomes)
    emit(options, { status: "request", model, ...o }, `${model} ${o.kind ?? "request"}${o.version ? ` ${o.version}` : ""}: ${o.state}: ${o.message}`);
}
