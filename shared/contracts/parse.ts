import type { z } from "zod";
import { ContractError } from "../errors.ts";

/**
 * Validates `data` against a contract schema and returns the typed, defaulted value. The first
 * problem becomes a `ContractError` naming the field, so a user reads `labels.1 must be unique`
 * rather than a schema dump.
 */
export function parseContract<S extends z.ZodType>(schema: S, data: unknown, what: string): z.output<S> {
  const result = schema.safeParse(data);
  if (result.success) return result.data;
  const issue = result.error.issues[0];
  const field = issue ? issue.path.map(String).join(".") : "";
  throw new ContractError(what, field, issue ? lowerFirst(issue.message) : "is invalid");
}

/** Parses JSON text first, so a truncated file gets the same kind of error as a wrong field. */
export function parseContractJson<S extends z.ZodType>(schema: S, text: string, what: string): z.output<S> {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch {
    throw new ContractError(what, "", "is not valid JSON");
  }
  return parseContract(schema, data, what);
}

/**
 * JSON bytes or text checked against a schema, without throwing: for files read from storage that anyone
 * with write access there may have left malformed (a capture, a decision, counters, settings). Malformed
 * JSON and a wrong shape are the same answer: not this contract, and why.
 */
export function tryParseContractJson<S extends z.ZodType>(
  schema: S,
  input: Uint8Array | string,
): { success: true; data: z.output<S> } | { success: false; problem: string } {
  let data: unknown;
  try {
    data = JSON.parse(typeof input === "string" ? input : new TextDecoder().decode(input));
  } catch {
    return { success: false, problem: "not valid JSON" };
  }
  const result = schema.safeParse(data);
  if (result.success) return { success: true, data: result.data };
  return { success: false, problem: result.error.issues[0]?.message ?? "invalid" };
}

function lowerFirst(s: string): string {
  return s.charAt(0).toLowerCase() + s.slice(1);
}
