#!/usr/bin/env node
/**
 * `edgetune`: the one command line for training and for managing datasets and models. The local
 * stack, the tests and the AWS Batch container all run training through `edgetune train`.
 * S3 comes from the environment (EDGETUNE_BUCKET, AWS_REGION, EDGETUNE_S3_ENDPOINT, AWS_*), or
 * --bucket / --endpoint.
 *
 * This file only wires the program: each command group lives in src/commands/<group>.ts, and errors
 * from every command become one user message and exit code here.
 */
import { Command } from "commander";
import { InvalidOptionError, userMessage } from "#shared/errors.ts";
import { addBaseCommands } from "./src/commands/base.ts";
import { addClassifyCommand } from "./src/commands/classify.ts";
import { addDatasetCommands } from "./src/commands/datasets.ts";
import { addExportCommand } from "./src/commands/export.ts";
import { addModelCommands } from "./src/commands/models.ts";
import { addTrafficCommands } from "./src/commands/traffic.ts";
import { addTrainCommands } from "./src/commands/train.ts";
import { say } from "./src/output.ts";

const program = new Command("edgetune")
  .description("Transfer learning for image classifiers: S3 dataset in, tfjs model out, served at the edge.")
  .option("--bucket <name>", "S3 bucket (default: $EDGETUNE_BUCKET)")
  .option("--endpoint <url>", "S3 endpoint for S3-compatible servers (default: $EDGETUNE_S3_ENDPOINT)")
  .showHelpAfterError("(run with --help for usage)");

// Registration order is the order `edgetune --help` lists the commands in.
addTrainCommands(program); // train, embed
addBaseCommands(program); // base import, base list
addDatasetCommands(program); // push, status, datasets
addTrafficCommands(program); // capture, review, monitor
addModelCommands(program); // models, current, rollback, report
addClassifyCommand(program); // classify
addExportCommand(program); // export

// Commander reports its own parse errors (exit 1); everything a command throws ends here: a typed
// error's message for people, anything else "Internal error", and the stack only with EDGETUNE_DEBUG.
try {
  await program.parseAsync(process.argv);
} catch (e) {
  say(`edgetune: ${e instanceof InvalidOptionError ? e.message : userMessage(e)}`);
  if (process.env.EDGETUNE_DEBUG) console.error(e);
  process.exitCode = 1;
}
