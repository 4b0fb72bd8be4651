/** `edgetune classify`: the edge worker's classify endpoint, called as a client would. */
import { readFile } from "node:fs/promises";
import type { Command } from "commander";
import type { Answer } from "#shared/answer.ts";
import { EdgetuneError, NotFoundError } from "#shared/errors.ts";
import { answerText } from "../answer-text.ts";
import { contentTypeOf } from "../catalog/catalog.ts";
import { emit } from "../output.ts";
import { int, num } from "./options.ts";

export function addClassifyCommand(program: Command): void {
  program
    .command("classify <model> <images...>")
    .description("Classify image files with the edge worker, as a client would")
    .option("--url <url>", "the worker's URL (default: $EDGETUNE_EDGE_URL)")
    .option("--key <key>", "an API key (default: $EDGETUNE_API_KEY)")
    .option("--top <k>", "labels per image", int("top"), 3)
    .option("--threshold <score>", "one score threshold (0 to 1) for every label instead of the version's per-label ones", num("threshold"))
    .option("--json", "the worker's JSON answer per image")
    .action(async (model: string, images: string[], o: { url?: string; key?: string; top: number; threshold?: number; json?: boolean }) => {
      const url = (o.url ?? process.env.EDGETUNE_EDGE_URL)?.replace(/\/$/, "");
      const key = o.key ?? process.env.EDGETUNE_API_KEY;
      if (!url || !key)
        throw new EdgetuneError("invalid_option", "Say where the worker is and how to get in: --url (or EDGETUNE_EDGE_URL) and --key (or EDGETUNE_API_KEY).");
      let failed = 0;
      for (const file of images) {
        const bytes = await readFile(file).catch(() => {
          throw new NotFoundError(`Cannot read ${file}.`);
        });
        const threshold = o.threshold === undefined ? "" : `&threshold=${o.threshold}`;
        const res = await fetch(`${url}/v1/models/${encodeURIComponent(model)}/classify?top_k=${o.top}${threshold}`, {
          method: "POST",
          headers: { authorization: `Bearer ${key}`, "content-type": contentTypeOf(file) },
          body: bytes,
        }).catch((e: unknown) => {
          throw new EdgetuneError("edge_unreachable", `The worker at ${url} cannot be reached (${e instanceof Error ? e.message : e}).`);
        });
        const body = (await res.json()) as Partial<Answer> & { error?: { message: string } };
        if (!res.ok) failed++;
        emit(
          o,
          { file, status: res.status, ...body },
          `${file}: ${res.ok ? answerText({ ...body, predictions: body.predictions ?? [] }) : `HTTP ${res.status}: ${body.error?.message ?? ""}`}`,
        );
      }
      if (failed > 0) process.exitCode = 1;
    });
}
