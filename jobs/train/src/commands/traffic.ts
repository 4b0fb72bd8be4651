/** `edgetune capture`, `review` and `monitor`: what the edge sees of a model's traffic, and learning from it. */
import type { Command } from "commander";
import { EdgetuneError } from "#shared/errors.ts";
import { createLogger } from "../log.ts";
import { emit, emitList, percent, say } from "../output.ts";
import { operatorKeysFromEnv, saveCaptureImages } from "../traffic/review.ts";
import {
  applyDecisions,
  captureRuleText,
  listCaptures,
  monitor,
  parseBelow,
  parseRate,
  readCaptureConfig,
  reviewNow,
  writeCaptureConfig,
} from "../traffic/traffic.ts";
import { int, storeFrom } from "./options.ts";

export function addTrafficCommands(program: Command): void {
  program
    .command("capture <model>")
    .description("Show or change what the edge stores of a model's traffic for review (off until turned on; README: Learning from traffic)")
    .option("--on", "turn capture on")
    .option("--off", "turn capture off (nothing more is stored; what was stored expires)")
    .option(
      "--below <score>",
      'store inputs whose top score is below this (0–1), or "unsure" (the default: those the served version answers unsure, per-label thresholds)',
    )
    .option("--sample <rate>", "and this share of the other inputs (0–1 or a percentage)")
    .option("--max-per-day <n>", "at most this many inputs a day, all edge isolates together", int("--max-per-day"))
    .option("--max-mb-per-day <n>", "at most this many MB a day", int("--max-mb-per-day"))
    .option("--json", "the settings as JSON")
    .action(
      async (
        model: string,
        o: { on?: boolean; off?: boolean; below?: string; sample?: string; maxPerDay?: number; maxMbPerDay?: number; json?: boolean },
        cmd: Command,
      ) => {
        const store = storeFrom(cmd.optsWithGlobals());
        const changes = {
          ...(o.on ? { enabled: true } : {}),
          ...(o.off ? { enabled: false } : {}),
          ...(o.below !== undefined ? { belowConfidence: parseBelow(o.below) } : {}),
          ...(o.sample !== undefined ? { sampleRate: parseRate(o.sample, "--sample") } : {}),
          ...(o.maxPerDay !== undefined ? { maxPerDay: o.maxPerDay } : {}),
          ...(o.maxMbPerDay !== undefined ? { maxBytesPerDay: o.maxMbPerDay * 1024 * 1024 } : {}),
        };
        const config = Object.keys(changes).length > 0 ? await writeCaptureConfig(store, model, changes) : await readCaptureConfig(store, model);
        emit(
          o,
          { model, ...config },
          config.enabled
            ? `Capture of ${model} is on: ${captureRuleText(config)} and ${percent(config.sampleRate)} of the others, at most ${config.maxPerDay} a day (${Math.round(config.maxBytesPerDay / 1048576)} MB), kept ${config.maxSide} px at most. Review: edgetune review ${model}.`
            : `Capture of ${model} is off. Turn it on: edgetune capture ${model} --on.`,
        );
      },
    );

  program
    .command("review <model>")
    .description("The inputs the edge captured for review; accept (into the dataset, under the predicted or a corrected label) or discard them")
    .option("--accept <ids>", "comma-separated capture ids (or <id>@<sha256> from --save) to add to the dataset")
    .option("--as <label>", "with --accept: the true label (default: the predicted one)")
    .option("--discard <ids>", "comma-separated capture ids to drop")
    .option("--save <dir>", "save the images waiting for review into <dir>, named <id>@<sha256>; --accept <id>@<sha256> then adds exactly those bytes")
    .option("--unseen", "with --accept <id> (no @<sha256>): add the image stored now, without having looked at it")
    .option("--json", "one JSON object per capture, or the applied decisions")
    .action(async (model: string, o: { accept?: string; as?: string; discard?: string; save?: string; unseen?: boolean; json?: boolean }, cmd: Command) => {
      const store = storeFrom(cmd.optsWithGlobals());
      const ids = (list?: string) =>
        (list ?? "")
          .split(",")
          .map((x) => x.trim())
          .filter(Boolean);
      // Thrown inside an action, so an EdgetuneError: commander's own errors are only understood while parsing.
      if (o.as && !o.accept) throw new EdgetuneError("invalid_option", "--as goes with --accept: edgetune review <model> --accept <ids> --as <label>.");
      if (o.save) {
        const saved = await saveCaptureImages(store, model, o.save);
        emitList(o, saved, `Nothing of ${model} is waiting for review.`, ["ID", "FILE"], (f) => [f.id, f.file]);
        return;
      }
      if (!o.accept && !o.discard) {
        const pending = await listCaptures(store, model);
        emitList(
          o,
          pending,
          `Nothing of ${model} is waiting for review${(await readCaptureConfig(store, model)).enabled ? "" : ` (capture is off: edgetune capture ${model} --on)`}.`,
          ["ID", "CAPTURED", "VERSION", "PREDICTED", "SCORE", "WHY", "DECIDED"],
          (c) => [
            c.id,
            c.capturedAt.replace("T", " ").slice(0, 19),
            c.version,
            c.predictions[0]?.label ?? "",
            percent(c.predictions[0]?.score),
            c.reason === "low_confidence" ? "unsure" : "sampled",
            c.decision ? `${c.decision.action}${c.decision.label ? ` as ${c.decision.label}` : ""} (${c.decision.by})` : "",
          ],
        );
        return;
      }
      // Made here, bound to the bytes shown, applied from memory (traffic/review.ts). Console decisions are
      // applied by the nightly run, or here too when EDGETUNE_CONSOLE_KEYS lets their signatures be checked.
      const log = createLogger();
      const r = await reviewNow(store, model, { accept: ids(o.accept), discard: ids(o.discard), as: o.as, unseen: o.unseen }, log);
      if (operatorKeysFromEnv().length > 0) {
        const signed = await applyDecisions(store, model, log);
        r.accepted.push(...signed.accepted);
        r.discarded.push(...signed.discarded);
        r.refused.push(...signed.refused);
      }
      // Each label said: without --as it came from the capture's record, which the edge may rewrite.
      if (!o.json) for (const a of r.accepted) say(`added: ${a.id} as ${a.key.split("/").at(-2)} (${a.key})`);
      for (const f of r.refused) say(`not added: ${f.id}: ${f.reason}`);
      // The dataset the images joined (the model's own), named so the suggested command runs as printed.
      const dataset = r.accepted[0]?.key.split("/")[1];
      emit(
        o,
        r,
        `${r.accepted.length} added to the dataset, ${r.discarded.length} discarded${r.refused.length ? `, ${r.refused.length} refused` : ""}.${dataset ? ` The next nightly run trains on the added images (or now: edgetune train --dataset ${dataset}).` : ""}`,
      );
      if (r.refused.length > 0) process.exitCode = 1;
    });

  program
    .command("monitor <model>")
    .description("The served model's traffic per day (answers, low-confidence share, predicted labels) against its held-out split, with drift flags")
    .option("--days <n>", "how many days back", int("--days"), 7)
    .option("--json", "the summary as JSON")
    .action(async (model: string, o: { days: number; json?: boolean }, cmd: Command) => {
      const store = storeFrom(cmd.optsWithGlobals());
      const s = await monitor(store, model, { days: o.days });
      if (o.json) {
        emit(o, s, "");
        return;
      }
      const ref = s.reference;
      const share = (labels: Record<string, number>, total: number) =>
        Object.entries(labels)
          .sort((a, b) => b[1] - a[1])
          .slice(0, 3)
          .map(([l, n]) => `${l} ${Math.round((100 * n) / Math.max(1, total))}%`)
          .join(", ");
      emitList(
        o,
        s.days,
        `No traffic of ${model} counted in the last ${o.days} days (edge isolates flush their counters every minute or so).`,
        ["DAY", "ANSWERS", `UNDER ${s.threshold}`, "TOP PREDICTED", "CAPTURED", "DRIFT"],
        (d) => [
          d.day,
          String(d.requests),
          percent(d.lowConfidence / Math.max(1, d.requests)),
          share(d.labels, d.requests),
          String(d.captured),
          d.drift.join("; ") || "—",
        ],
      );
      if (ref) {
        emit(
          o,
          null,
          `Held-out split of ${ref.version} (${ref.evaluatedOn} images): ${heldOutUnder(ref, s.threshold)}; predicted ${share(Object.fromEntries(Object.entries(ref.labels).map(([l, v]) => [l, v * 100])), 100)}.`,
        );
      }
    });
}

/** How many held-out answers scored under the threshold, as the count it is (a share of 6 images is not "90.0 %"). */
function heldOutUnder(ref: { evaluatedOn: number; lowConfidence: number | null }, threshold: number): string {
  if (ref.lowConfidence === null) return `answers under ${threshold} not known exactly for this version (trained before per-image scores were kept)`;
  return `${Math.round(ref.lowConfidence * ref.evaluatedOn)} of ${ref.evaluatedOn} answers under ${threshold}`;
}
