import { readPointer, readPointerBasis } from "#shared/artifacts.ts";
import { userMessage } from "#shared/errors.ts";
import { heldOutSha256 } from "#shared/held-out.ts";
import { keys } from "#shared/keys.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
import type { TrainInput } from "./config.ts";
import { type EmbedFanOut, FanOutHandedOver } from "./features/fan-out.ts";
import { pooledFeatures } from "./features/pooled.ts";
import { fitClassifier } from "./fit/fit.ts";
import type { Logger } from "./log.ts";
import { initBackend } from "./model/backend.ts";
import { loadBase } from "./model/bases.ts";
import { chooseBase } from "./model/choose-base.ts";
import { exportVersion } from "./model/export.ts";
import { planRun, versionExists } from "./plan.ts";
import { answerRules, noneIndexOf } from "./release/answers.ts";
import { evaluate } from "./release/evaluate.ts";
import { acquireLock } from "./release/lock.ts";
import { evaluateOod } from "./release/ood.ts";
import { checkOwnership } from "./release/ownership.ts";
import { decidePromotion, loadCurrent } from "./release/promote.ts";
import { existsResult, publishVersion, type TrainResult } from "./release/publish.ts";
import { type RunContext, runContext } from "./run.ts";
import { adoptQueued, StatusRecorder } from "./status.ts";

export type { TrainOptions } from "./config.ts";
export type { TrainResult } from "./release/publish.ts";

export interface TrainContext {
  /** Where a large extraction may be spread over other machines (AWS Batch array jobs); none: this machine does it all. */
  fanOut?: EmbedFanOut;
}

/**
 * One training run, end to end, as its stages: plan (dataset, options, base, version id) → features
 * (cached, frozen base) → fit (head, then the top blocks for `finetune`) → evaluate on held-out images →
 * export (verified by reloading) → promotion decision → publish (new immutable version, pointer if
 * promoted). The CLI, the local dispatcher, the tests and the Batch container all call this function.
 */
export async function train(store: ObjectStore, input: TrainInput, log: Logger, context: TrainContext = {}): Promise<TrainResult> {
  // The run's status record (status.ts): running with its stage and progress, then done or failed.
  const status = new StatusRecorder(store, input.dataset, "running", await adoptQueued(store, input.dataset));
  await status.update({}, true);
  try {
    const result = await trainRun(
      runContext(store, status.logger(log), (phase) => void status.update({ phase, progress: undefined })),
      input,
      context,
    );
    const { name: model, version, promoted, accuracy, reason } = result;
    const report = keys.versionFile(model, version, "report.html");
    // Already trained: nothing changed; "promoted" says whether that version is the one served.
    const unchanged = result.status === "exists" ? true : undefined;
    const served = unchanged ? (await readPointer(store, model).catch(() => null))?.version === version : promoted;
    await status.update({ state: "done", model, version, promoted: served, unchanged, accuracy, reason, report, phase: undefined, progress: undefined }, true);
    return result;
  } catch (e) {
    // Handed over to array children and a continuation (fan-out.ts): not over, the continuation reports.
    const handedOver = e instanceof FanOutHandedOver;
    const handOvers = (status.current.handOvers ?? 0) + (handedOver ? 1 : 0);
    await status.update({ state: handedOver ? "queued" : "failed", reason: userMessage(e), handOvers }, true);
    throw e;
  }
}

async function trainRun(ctx: RunContext, input: TrainInput, context: TrainContext): Promise<TrainResult> {
  const { store, log } = ctx;
  const backend = await initBackend();
  log.info(`backend ${backend.name}`, { reason: backend.reason });
  const planned = await planRun(ctx, input);
  if (await versionExists(ctx, planned)) return existsResult(ctx, planned, "already trained (same dataset fingerprint and options)");
  // One run per model at a time; a duplicate trigger waits here, then finds its version written.
  const lock = await acquireLock(store, planned.name);
  try {
    if (await versionExists(ctx, planned)) return existsResult(ctx, planned, "written by a concurrent run of the same dataset and config");
    // The served version, read once: the model's dataset and labels are checked against it, it seeds the
    // warm start and is scored against the new one; the pointer is written only if it is still the one
    // read here (publish.ts).
    const served = await readPointerBasis(store, planned.name);
    await checkOwnership(store, planned, served.pointer);
    // `--base best`: the base is chosen now, by cross-validation on the training split's features.
    const plan = planned.candidates ? await chooseBase(ctx, planned, planned.candidates) : planned;
    noneIndexOf(plan); // a manifest naming a none-of-these folder the dataset lacks fails before any work
    const baseModel = await loadBase(store, plan.base, plan.options.imageSize);
    const current = await loadCurrent(store, plan.name, served.pointer);
    try {
      const pooled = await pooledFeatures(ctx, plan, baseModel, context.fanOut);
      const fitted = await fitClassifier(ctx, plan, baseModel, pooled, current);
      const lastValLoss = fitted.history.fineTune.at(-1)?.valLoss ?? fitted.history.head.at(-1)?.valLoss;
      const answers = await answerRules(ctx, plan, fitted);
      // Scores as the served model gives them (calibrated, out of fold: see fit/calibrate.ts).
      const evaluation = evaluate(
        plan.dataset.labels,
        Array.from(fitted.yVal),
        answers.calibration.probs,
        pooled.val.map((i) => i.key),
        lastValLoss,
      );
      // Which images these numbers are about: the console says when two versions' are not like for like.
      evaluation.metrics.heldOutSha256 = await heldOutSha256(pooled.val);
      log.info("evaluation", {
        accuracy: evaluation.metrics.accuracy,
        evaluatedOn: evaluation.metrics.evaluatedOn,
        eceBefore: answers.calibration.eceBefore,
        eceAfter: answers.calibration.eceAfter,
        answered: answers.answered.answered,
        answeredAccuracy: answers.answered.answeredAccuracy,
      });
      const exported = await exportVersion(ctx, plan, baseModel, fitted.head, pooled);
      const ood = await evaluateOod(ctx, plan, exported, fitted, answers);
      const promotion = await decidePromotion(ctx, plan, current, pooled, evaluation);
      return await publishVersion(ctx, plan, { backend, pooled, fitted, answers, evaluation, exported, promotion, served, ood });
    } finally {
      baseModel.dispose();
      if (current && "model" in current) current.model.dispose();
    }
  } finally {
    await lock.release();
  }
}
