import { type Command, Option } from "commander";
import { EXPORT_FORMATS, type ExportFormat, exportModel } from "../export/export.ts";
import { emit } from "../output.ts";
import { storeFrom } from "./options.ts";

/** `edgetune export`: a version as one ONNX file or as tfjs files, to run outside the edge. */
export function addExportCommand(program: Command): void {
  program
    .command("export <model> [version]")
    .description(
      "Save a version (default: the served one) to run anywhere: one ONNX file (uint8 RGB in, probabilities out), or the tfjs files with metadata.json",
    )
    .addOption(new Option("--format <format>", "onnx or tfjs").choices(EXPORT_FORMATS).default("onnx"))
    .option("--out <path>", "the file (onnx) or folder (tfjs) to write (default: ./<model>-<version>.onnx or ./<model>-<version>-tfjs)")
    .option("--json", "one JSON line describing what was written")
    .action(async (model: string, version: string | undefined, o: { format: ExportFormat; out?: string; json?: boolean }, cmd: Command) => {
      const r = await exportModel(storeFrom(cmd.optsWithGlobals()), model, { version, format: o.format, out: o.out });
      const size = `${(r.bytes / 1e6).toFixed(1)} MB`;
      emit(
        o,
        r,
        r.format === "onnx"
          ? `${r.path}: ${model} ${r.version} as ONNX (opset ${r.opset}, ${size}). Input "image": uint8 [N, ${r.inputSize}, ${r.inputSize}, 3] RGB, ` +
              `resized as the README's "Export" section says; output "probabilities" in the order of ${r.labels.length} labels: ${r.labels.join(", ")}.`
          : `${r.path}/: ${model} ${r.version} as tfjs files with metadata.json (${size}).`,
      );
    });
}
