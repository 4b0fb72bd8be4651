import type { MiddlewareHandler } from "hono";
import { bearerAuth } from "hono/bearer-auth";
import { timingSafeEqual } from "hono/utils/buffer";
import { sha256 } from "hono/utils/crypto";
import { errorBody } from "./errors.ts";

/**
 * Bearer API keys from the `API_KEYS` secret (comma-separated), read on every request. Hono's
 * bearerAuth parses the header, which limits keys to RFC 6750 token characters (A-Z a-z 0-9 - . _ ~ +
 * / and trailing =; generated keys are base64url). An entry `key:modelA+modelB` limits that key to those
 * models (see modelScope); ':' is no token character, so no key can be mistaken for a scope. With no keys
 * configured every request is refused.
 */
export function apiKeyAuth(): MiddlewareHandler<{ Bindings: Env }> {
  return keyAuth(async (env) => [...(await clientKeys(env)), ...(await operatorKeys(env))]);
}

/** The models a request's key may use: every one (operator keys, client keys without a scope) or those listed. */
export type ModelScope = "all" | ReadonlySet<string>;

/**
 * The scope of the request's key: the union of its entries, every model if one of them has no scope. Routes
 * check it before the registry is asked, so a model outside it is answered as a missing one, with no
 * storage read or model load to time.
 */
export async function modelScope(authorization: string | undefined, env: Env): Promise<ModelScope> {
  const token = bearerToken(authorization);
  if (!token) return new Set();
  if ((await matching(token, await operatorKeys(env))).length > 0) return "all";
  const entries = await matching(token, await clientKeys(env));
  if (entries.some((e) => e.models === null)) return "all";
  return new Set(entries.flatMap((e) => [...(e.models ?? [])]));
}

export const inScope = (scope: ModelScope, model: string) => scope === "all" || scope.has(model);

/**
 * The console's listings (every model, its versions, reports with thumbnails of training images) are
 * for operators: only `CONSOLE_API_KEYS` open them, not the clients' classify keys. Runs after
 * `apiKeyAuth`, so a client key gets a 403 that says why, and an unset secret says how to turn it on.
 */
export function consoleAuth(): MiddlewareHandler<{ Bindings: Env }> {
  const operators = keyAuth(operatorKeys);
  return async (c, next) => {
    if (!(c.env.CONSOLE_API_KEYS ?? "").trim())
      return c.json(
        errorBody("console_disabled", "Listing models is for operators: set the CONSOLE_API_KEYS secret on the worker and use one of its keys."),
        403,
      );
    let admitted = false;
    try {
      return await operators(c, async () => {
        admitted = true;
        await next();
      });
    } catch (e) {
      if (admitted) throw e; // the route's own error, not the key's
      return c.json(errorBody("forbidden", "This key may classify but not list models or read reports; use an operator key (CONSOLE_API_KEYS)."), 403);
    }
  };
}

/**
 * True when the request carries one of the operators' keys (CONSOLE_API_KEYS), without refusing anyone:
 * for routes that answer everyone but tell operators more (/healthz, a model's description).
 */
export async function isOperator(authorization: string | undefined, env: Env): Promise<boolean> {
  const token = bearerToken(authorization);
  return token !== undefined && (await matching(token, await operatorKeys(env))).length > 0;
}

const bearerToken = (authorization: string | undefined) => /^Bearer\s+(\S+)\s*$/i.exec(authorization ?? "")?.[1];

function keyAuth(source: (env: Env) => Promise<KeyEntry[]>): MiddlewareHandler<{ Bindings: Env }> {
  return bearerAuth<{ Bindings: Env }>({
    realm: "edgetune",
    verifyToken: async (token, c) => (await matching(token, await source(c.env))).length > 0,
    // Hono's own answers are plain text, and 400 for a malformed header; this API has always answered
    // 401 in its JSON error shape, and never echoes what was sent.
    noAuthenticationHeader: { message: () => unauthorized(MISSING) },
    invalidAuthenticationHeader: { message: () => unauthorized(MISSING), wwwAuthenticateHeader: 'Bearer realm="edgetune"' },
    invalidToken: { message: () => unauthorized("The API key is not valid."), wwwAuthenticateHeader: 'Bearer realm="edgetune", error="invalid_token"' },
  });
}

const MISSING = "Send an API key as 'Authorization: Bearer <key>'.";

/** A Response rather than a plain object: Hono then keeps its status instead of using its own 400. */
const unauthorized = (message: string) => Response.json(errorBody("unauthorized", message), { status: 401 });

/** A configured key: its digest, and the models it is limited to (null: every model). */
interface KeyEntry {
  digest: string;
  models: ReadonlySet<string> | null;
}

/** The entries the presented token is, compared in time that tells neither which matched nor a key's length. */
async function matching(token: string, entries: KeyEntry[]): Promise<KeyEntry[]> {
  // Hono's timingSafeEqual also compares the raw strings, in time that grows with the longer one;
  // comparing SHA-256 digests (always 64 characters) keeps a key's length from leaking as well.
  const presented = await sha256(token);
  if (presented === null) return [];
  const found: KeyEntry[] = [];
  // No early exit: the time does not depend on which key matched either.
  for (const entry of entries) if (await timingSafeEqual(entry.digest, presented)) found.push(entry);
  return found;
}

const clientKeys = (env: Env) => keyEntries(env.API_KEYS ?? "");
/** The operator keys themselves (the unscoped entries of CONSOLE_API_KEYS): what console requests and their outcomes are signed with. */
export function operatorKeyValues(env: Env): string[] {
  return (env.CONSOLE_API_KEYS ?? "")
    .split(",")
    .map((entry) => entry.trim())
    .filter((entry) => entry && !entry.includes(":"));
}

/** Operator keys are never scoped: an entry written with a scope is not an operator key at all. */
const operatorKeys = async (env: Env) => (await keyEntries(env.CONSOLE_API_KEYS ?? "")).filter((e) => e.models === null);

/** The configured keys (`key` or `key:modelA+modelB`), parsed and hashed again only when a secret changes. */
const cached = new Map<string, Promise<KeyEntry[]>>();
function keyEntries(source: string): Promise<KeyEntry[]> {
  let entries = cached.get(source);
  if (!entries) {
    const parsed = source
      .split(",")
      .map((entry) => entry.trim())
      .filter(Boolean)
      .map((entry) => {
        const [key = "", scope] = entry.split(/:(.*)/s);
        // `key:` with nothing after it may use no model: a typo shuts the key out rather than opening every model.
        const models: ReadonlySet<string> | null =
          scope === undefined
            ? null
            : new Set(
                scope
                  .split("+")
                  .map((m) => m.trim())
                  .filter(Boolean),
              );
        return { key: key.trim(), models };
      })
      .filter((e) => e.key);
    entries = Promise.all(
      parsed.map(async ({ key, models }): Promise<KeyEntry[]> => {
        const digest = await sha256(key);
        return digest === null ? [] : [{ digest, models }];
      }),
    ).then((d) => d.flat());
    if (cached.size > 8) cached.clear();
    cached.set(source, entries);
  }
  return entries;
}
