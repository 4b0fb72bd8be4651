/** `edgetune push`, `status` and `datasets`: datasets and the training runs they trigger. */
import { type Command, Option } from "commander";
import { nameSchema, STRATEGIES } from "#shared/contracts/common.ts";
import { EdgetuneError, InvalidOptionError } from "#shared/errors.ts";
import { listDatasets, pushDataset } from "../catalog/catalog.ts";
import { createLogger } from "../log.ts";
import { emit, emitList, say } from "../output.ts";
import { followRun, listRunStatuses, type RunStatus, StatusRecorder } from "../status.ts";
import { storeFrom } from "./options.ts";

export function addDatasetCommands(program: Command): void {
  program
    .command("push <folder>")
    .description("Upload a folder (one sub-folder per label, or train/ and val/ splits) as a dataset; the manifest is written last and triggers training.")
    .requiredOption("--dataset <name>", "dataset name")
    .addOption(new Option("--strategy <strategy>").choices(STRATEGIES))
    .option("--base <id>", "base model for this dataset")
    .option("--wait", "follow the training run this push triggers to its end; exit 0 if its version is served, 2 if kept back, 1 if it failed")
    .option("--dry-run", "check the folder with the training job's rules (and decode a sample) without uploading")
    .option("--drop-captured", "also remove accepted captures (captured-*) from the dataset; by default a push keeps them")
    .option("--json", "the result (and with --wait the run's states) as JSON lines")
    .action(
      async (
        folder: string,
        o: { dataset: string; strategy?: "head" | "finetune"; base?: string; wait?: boolean; dryRun?: boolean; dropCaptured?: boolean; json?: boolean },
        cmd: Command,
      ) => {
        const log = createLogger();
        const store = storeFrom(cmd.optsWithGlobals());
        const since = new Date().toISOString();
        const r = await pushDataset(store, folder, o.dataset, { strategy: o.strategy, base: o.base }, (d, t) => log.progress("upload", d, t), {
          dryRun: o.dryRun,
          dropCaptured: o.dropCaptured,
          // The queued record exists before the trigger does: a run that starts at once still finds it.
          beforeManifest: () => new StatusRecorder(store, o.dataset, "queued").update({}, true),
        });
        for (const w of r.warnings) say(`warning: ${w}`);
        // The dataset becomes what the folder holds: say what that takes away.
        const gone = r.removed.length > 10 ? `${r.removed.slice(0, 10).join(", ")} and ${r.removed.length - 10} more` : r.removed.join(", ");
        if (r.removed.length > 0) say(`${o.dryRun ? "would remove" : "removed"} ${r.removed.length} file(s) of ${o.dataset} the folder no longer has: ${gone}`);
        const labels = Object.entries(r.labels)
          .map(([l, n]) => `${l} ${n}`)
          .join(", ");
        if (o.dryRun) {
          emit(
            o,
            { dataset: o.dataset, labels: r.labels, notImages: r.skipped.length, warnings: r.warnings, removed: r.removed },
            `${o.dataset}: ${labels} — ready to push (nothing was uploaded).`,
          );
          return;
        }
        emit(
          o,
          { dataset: o.dataset, uploaded: r.uploaded, removed: r.removed, notImages: r.skipped.length, state: "queued" },
          `Uploaded ${r.uploaded} images of ${o.dataset} (${labels}); training is triggered (the manifest was written last).${o.wait ? "" : ` Follow it: edgetune status ${o.dataset} --follow`}`,
        );
        if (!o.wait) return;
        const final = await followRun(store, o.dataset, since, (s) => emit(o, s, describeRun(s)));
        if (!final) throw new EdgetuneError("wait_timeout", `No run of ${o.dataset} finished within 6 hours; see edgetune status ${o.dataset}.`);
        process.exitCode = exitCodeOf(final);
      },
    );

  program
    .command("status [dataset]")
    .description("Recent training runs (of one dataset, or of all): queued, running with its phase, done (promoted or not, and why) or failed")
    .option("--follow", "follow the newest run of the dataset until it ends; exit 0 if promoted, 2 if kept back, 1 if it failed")
    .option("--json", "one JSON object per run")
    .action(async (dataset: string | undefined, o: { follow?: boolean; json?: boolean }, cmd: Command) => {
      const store = storeFrom(cmd.optsWithGlobals());
      if (dataset !== undefined && !nameSchema.safeParse(dataset).success)
        throw new InvalidOptionError("dataset name", dataset, ["a name of 1–63 characters a-z, 0-9, '.', '_', '-'"]);
      const runs = await listRunStatuses(store, dataset);
      if (!o.follow) {
        if (runs.length === 0) say(dataset ? `No runs of ${dataset} yet (runs are kept 30 days).` : "No runs yet.");
        for (const s of runs) emit(o, s, describeRun(s));
        return;
      }
      if (!dataset) throw new EdgetuneError("invalid_option", "--follow needs a dataset: edgetune status <dataset> --follow");
      const newest = runs[0];
      if (!newest) throw new EdgetuneError("not_found", `No runs of ${dataset} yet; push it, or wait for the trigger.`);
      const final = await followRun(store, dataset, newest.startedAt, (s) => emit(o, s, describeRun(s)));
      if (final) process.exitCode = exitCodeOf(final);
    });

  program
    .command("datasets")
    .description("List datasets with their last training run")
    .option("--json", "one JSON object per dataset")
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const store = storeFrom(cmd.optsWithGlobals());
      const rows = [];
      for (const d of await listDatasets(store)) rows.push({ ...d, lastRun: (await listRunStatuses(store, d.name, 1))[0] ?? null });
      emitList(o, rows, "No datasets yet: edgetune push <folder> --dataset <name>.", ["DATASET", "FILES", "STATE", "LAST RUN"], (d) => [
        d.name,
        String(d.files),
        d.complete ? "complete" : "uploading (no manifest)",
        d.lastRun ? runOutcome(d.lastRun) : "—",
      ]);
    });
}

/** One line a person can read: when, which dataset, what state, and why. */
function describeRun(s: RunStatus): string {
  return `${s.startedAt.replace("T", " ").slice(0, 19)}  ${s.dataset.padEnd(20)} ${runOutcome(s)}`;
}

/** What state a run is in, and why. */
function runOutcome(s: RunStatus): string {
  return s.state === "running"
    ? `running: ${s.phase ?? "starting"}${s.progress ? ` ${s.progress.done}/${s.progress.total}` : ""}`
    : s.state === "done" && s.unchanged
      ? `already trained: ${s.model ?? ""} ${s.version ?? ""} (${s.promoted ? "served" : "not served"})`
      : s.state === "done"
        ? `${s.promoted ? "promoted" : "not promoted"} ${s.model ?? ""} ${s.version ?? ""}${s.accuracy !== undefined ? ` (${(s.accuracy * 100).toFixed(1)} %)` : ""}: ${s.reason ?? ""}${s.report ? `; report: ${s.report}` : ""}`
        : s.state === "failed"
          ? `failed: ${s.reason ?? "unknown reason"}`
          : "queued";
}

/** 0: the run's version is served (promoted now, or already trained and served); 2: kept back; 1: failed. */
const exitCodeOf = (s: RunStatus) => (s.state === "failed" ? 1 : s.promoted ? 0 : 2);
