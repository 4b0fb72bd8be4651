/** `edgetune models`, `current`, `rollback` and `report`: trained versions and which one is served. */
import { writeFile } from "node:fs/promises";
import type { Command } from "commander";
import { listVersions as listModelVersions } from "#shared/catalog.ts";
import { DEFAULT_POINTER_TTL_SECONDS, type ModelPointer } from "#shared/contracts/artifact.ts";
import { NotFoundError } from "#shared/errors.ts";
import { keys } from "#shared/keys.ts";
import { listModels, listVersions, rollback } from "../catalog/catalog.ts";
import { emit, emitList, percent, say } from "../output.ts";
import { storeFrom } from "./options.ts";

export function addModelCommands(program: Command): void {
  program
    .command("models [name]")
    .description("List models, or the versions of one model with their metrics (* marks the served one)")
    .option("--json", "one JSON object per model or version")
    .action(async (name: string | undefined, o: { json?: boolean }, cmd: Command) => {
      const store = storeFrom(cmd.optsWithGlobals());
      if (!name) {
        const models = await Promise.all(
          (await listModels(store)).map(async (m) => {
            // The shared reader, which does not throw for a model folder left half-written.
            const { pointer, versions } = await listModelVersions(store, m);
            return { name: m, current: pointer?.version ?? null, promotedAt: pointer?.promotedAt ?? null, versions: versions.length };
          }),
        );
        emitList(o, models, "No models yet: push a dataset (edgetune push <folder> --dataset <name>).", ["MODEL", "SERVED", "PROMOTED", "VERSIONS"], (m) => [
          m.name,
          m.current ?? "none",
          m.promotedAt?.replace("T", " ").slice(0, 19) ?? "—",
          String(m.versions),
        ]);
        return;
      }
      const { versions } = await listVersions(store, name);
      emitList(
        o,
        versions,
        `Model ${name} has no version with metadata yet.`,
        ["", "VERSION", "TRAINED", "ACCURACY", "HELD-OUT", "STRATEGY", "BASE", "IMAGES"],
        (v) => [
          v.current ? "*" : "",
          v.version,
          v.createdAt.replace("T", " ").slice(0, 19),
          percent(v.accuracy),
          String(v.evaluatedOn),
          v.strategy,
          v.base,
          String(v.images),
        ],
      );
    });

  program
    .command("current <name>")
    .description("Show the promoted version of a model")
    .option("--json", "the pointer (current.json) as JSON")
    .action(async (name: string, o: { json?: boolean }, cmd: Command) => {
      const { pointer } = await listVersions(storeFrom(cmd.optsWithGlobals()), name);
      if (!pointer) throw new NotFoundError(`Model ${name} has versions but none is promoted; promote one with edgetune rollback ${name} --to <version>.`);
      emit(o, pointer, describePointer(name, pointer));
    });

  program
    .command("rollback <name>")
    .description("Point the model at an earlier version (default: the one before the current)")
    .option("--to <version>", "version to serve")
    .option("--json", "the new pointer (current.json) as JSON")
    .action(async (name: string, o: { to?: string; json?: boolean }, cmd: Command) => {
      const { pointer: p, changed, duringRun } = await rollback(storeFrom(cmd.optsWithGlobals()), name, o.to);
      emit(
        o,
        { ...p, changed },
        changed
          ? `${name} now serves ${p.version} (was ${p.previous}); the edge picks it up within ${DEFAULT_POINTER_TTL_SECONDS} seconds (the worker's POINTER_TTL_SECONDS).`
          : `${name} already serves ${p.version}; nothing changed.`,
      );
      if (changed && duringRun) say(`A training run of ${name} is in progress: it will not undo this rollback (it ends not promoted).`);
    });

  program
    .command("report <model> [version]")
    .description("Save a version's training report (default: the served one) as HTML and say where it is; --json prints report.json")
    .option("--out <file>", "where to write the HTML (default: ./<model>-<version>-report.html)")
    .option("--json", "print report.json instead")
    .action(async (model: string, version: string | undefined, o: { out?: string; json?: boolean }, cmd: Command) => {
      const store = storeFrom(cmd.optsWithGlobals());
      const { pointer, versions } = await listVersions(store, model);
      const chosen = version ?? pointer?.version ?? versions.at(-1)?.version;
      if (!chosen || !versions.some((v) => v.version === chosen))
        throw new NotFoundError(`Model ${model} has no version ${chosen ?? "yet"}. Versions: ${versions.map((v) => v.version).join(", ") || "none"}.`);
      const key = keys.versionFile(model, chosen, o.json ? "report.json" : "report.html");
      const bytes = await store.get(key);
      if (!bytes) throw new NotFoundError(`Version ${chosen} of ${model} has no report (${key}).`);
      if (o.json) {
        // Stored indented for people who open it in S3; --json is one object a line, like every command.
        emit(o, JSON.parse(new TextDecoder().decode(bytes)), "");
        return;
      }
      const out = o.out ?? `${model}-${chosen}-report.html`;
      await writeFile(out, bytes);
      process.stdout.write(`${out}\n`);
      say(`Report of ${model} ${chosen} (s3://${store.bucket}/${key}) saved to ${out}; open it in a browser.`);
    });
}

/** The served version of a model, for people. */
function describePointer(name: string, p: ModelPointer): string {
  const back = p.history?.[0] ? `; edgetune rollback ${name} would serve ${p.history[0]}` : "";
  return `${name} serves ${p.version} since ${p.promotedAt.replace("T", " ").slice(0, 19)} UTC (${p.reason})${back}`;
}
