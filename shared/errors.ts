/**
 * Errors that reach a user. Every error edgetune raises on purpose is an `EdgetuneError`: it carries a
 * stable machine-readable `code` and a message written for the person who has to fix the problem.
 * Anything else that escapes is a bug, and the CLI and the worker show it as a generic failure
 * without a stack trace.
 */
export class EdgetuneError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** Data that breaks one of the contracts in `shared/contracts` (metadata, manifest, pointer, base). */
export class ContractError extends EdgetuneError {
  /** Dotted path of the offending field, e.g. `labels.2` or `files.0.sha256`. */
  readonly field: string;
  constructor(what: string, field: string, problem: string) {
    // A problem with the value as a whole names the value, not a field path a user never wrote.
    super("invalid_contract", field ? `${what}: field "${field}" ${problem}` : `${what} ${problem}`);
    this.field = field;
  }
}

/** A file whose bytes do not match the sha256 its metadata promised. */
export class IntegrityError extends EdgetuneError {
  constructor(path: string, expected: string, actual: string) {
    super(
      "integrity_mismatch",
      `${path} is corrupt or was tampered with: sha256 ${actual.slice(0, 12)}… does not match the recorded ${expected.slice(0, 12)}…`,
    );
  }
}

/** An option outside its allowed set; the message lists the valid choices. */
export class InvalidOptionError extends EdgetuneError {
  constructor(option: string, value: unknown, valid: readonly (string | number)[]) {
    super("invalid_option", `Invalid ${option} ${JSON.stringify(value)}. Valid values: ${valid.join(", ")}.`);
  }
}

/** Something the user asked for does not exist (a dataset, a base, a model version). */
export class NotFoundError extends EdgetuneError {
  constructor(message: string) {
    super("not_found", message);
  }
}

/** A dataset that cannot produce a classifier; the message says what to fix. */
export class DatasetError extends EdgetuneError {
  constructor(message: string) {
    super("dataset_unusable", message);
  }
}

/** One line a user can read, whatever was thrown. */
export function userMessage(error: unknown): string {
  if (error instanceof EdgetuneError) return error.message;
  if (error instanceof Error && error.name === "AbortError") return "Interrupted.";
  return "Internal error (this is a bug in edgetune; run with EDGETUNE_DEBUG=1 for details).";
}
