/** `edgetune base import|list`: the pretrained bases heads are trained on. */
import { type Command, Option } from "commander";
import { NORMALIZATIONS, type Normalization } from "#shared/preprocess.ts";
import { DEFAULT_OPTIONS } from "../config.ts";
import { AUTO_BASE, AUTO_DESCRIPTION, importBase, KNOWN_BASES, type ModelSource } from "../model/bases.ts";
import { emit, emitList } from "../output.ts";
import { storeFrom } from "./options.ts";

export function addBaseCommands(program: Command): void {
  const base = program.command("base").description("Pretrained bases");
  base
    .command("import <source>")
    .description("Store a Keras-style tfjs LayersModel (URL of model.json, local folder, or s3://bucket/prefix/) as a base, cut at its feature layer.")
    .requiredOption("--id <id>", "id to store it under (bases/<id>/)")
    .requiredOption("--feature-layer <layer>", "layer whose output feeds the head (e.g. out_relu)")
    .addOption(new Option("--normalization <n>", "input scaling the weights expect").choices(Object.keys(NORMALIZATIONS)).makeOptionMandatory())
    .option("--fine-tune-from <layer>", "default cut for fine-tuning")
    .option("--licence <text>", "licence of the weights")
    .option("--json", "the stored base as JSON")
    .action(
      async (
        source: string,
        o: { id: string; featureLayer: string; normalization: Normalization; fineTuneFrom?: string; licence?: string; json?: boolean },
        cmd: Command,
      ) => {
        const store = storeFrom(cmd.optsWithGlobals());
        const { initBackend } = await import("../model/backend.ts");
        await initBackend();
        const src: ModelSource = /^https?:\/\//.test(source)
          ? { kind: "url", url: source }
          : source.startsWith("s3://")
            ? { kind: "s3", store, key: source.replace(/^s3:\/\/[^/]+\//, "") }
            : { kind: "dir", path: source };
        const meta = await importBase(store, src, {
          id: o.id,
          featureLayer: o.featureLayer,
          normalization: o.normalization,
          fineTuneFrom: o.fineTuneFrom,
          licence: o.licence,
        });
        const bytes = meta.files.reduce((n, f) => n + f.bytes, 0);
        emit(
          o,
          { id: meta.id, sha256: meta.sha256, featureLayer: meta.featureLayer, bytes },
          `Base ${meta.id} stored (${(bytes / 1e6).toFixed(1)} MB, features from ${meta.featureLayer}); train with --base ${meta.id}.`,
        );
      },
    );
  base
    .command("list")
    .description("Bases edgetune knows by name")
    .option("--json", "one JSON object per base")
    .action((o: { json?: boolean }) => {
      const bases = [
        { id: AUTO_BASE, description: `The default: ${AUTO_DESCRIPTION}.`, default: DEFAULT_OPTIONS.base === AUTO_BASE },
        ...KNOWN_BASES.map((b) => ({ id: b.id, description: b.description, default: b.id === DEFAULT_OPTIONS.base })),
      ];
      emitList(o, bases, "", ["BASE", "DESCRIPTION"], (b) => [b.id + (b.default ? " (default)" : ""), b.description]);
    });
}
