import type { MiddlewareHandler } from "hono";
import { bearerAuth } from "hono/bearer-auth";
import { timingSafeEqual } from "hono/utils/buffer";
import { sha256 } from "hono/utils/crypto";
import { errorBody } from "./errors.ts";

/**
 * Bearer API keys from the `API_KEYS` secret (comma-separated), read on every request. Hono's
 * bearerAuth parses the header, which limits keys to RFC 6750 token characters (A-Z a-z 0-9 - . _ ~ +
 * / and trailing =; generated keys are base64url). With no keys configured every request is refused.
 */
export function apiKeyAuth(): MiddlewareHandler<{ Bindings: Env }> {
  return keyAuth((env) => `${env.API_KEYS ?? ""},${env.CONSOLE_API_KEYS ?? ""}`);
}

/**
 * The console's listings (every model, its versions, reports with thumbnails of training images) are
 * for operators: only `CONSOLE_API_KEYS` open them, not the clients' classify keys. Runs after
 * `apiKeyAuth`, so a client key gets a 403 that says why, and an unset secret says how to turn it on.
 */
export function consoleAuth(): MiddlewareHandler<{ Bindings: Env }> {
  const operators = keyAuth((env) => env.CONSOLE_API_KEYS ?? "");
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
  const token = /^Bearer\s+(\S+)\s*$/i.exec(authorization ?? "")?.[1];
  if (!token) return false;
  const presented = await sha256(token);
  if (presented === null) return false;
  let ok = false;
  for (const key of await keyDigests(env.CONSOLE_API_KEYS ?? "")) if (await timingSafeEqual(key, presented)) ok = true;
  return ok;
}

function keyAuth(source: (env: Env) => string): MiddlewareHandler<{ Bindings: Env }> {
  return bearerAuth<{ Bindings: Env }>({
    realm: "edgetune",
    verifyToken: async (token, c) => {
      // Hono's timingSafeEqual also compares the raw strings, in time that grows with the longer one;
      // comparing SHA-256 digests (always 64 characters) keeps a key's length from leaking as well.
      const presented = await sha256(token);
      if (presented === null) return false;
      let ok = false;
      // No early exit: the time does not depend on which key matched either.
      for (const key of await keyDigests(source(c.env))) if (await timingSafeEqual(key, presented)) ok = true;
      return ok;
    },
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

/** Digests of the configured keys, computed again only when a secret changes. */
const cached = new Map<string, Promise<string[]>>();
function keyDigests(source: string): Promise<string[]> {
  let digests = cached.get(source);
  if (!digests) {
    const keys = source
      .split(",")
      .map((k) => k.trim())
      .filter(Boolean);
    digests = Promise.all(keys.map(sha256)).then((d) => d.filter((x): x is string => x !== null));
    if (cached.size > 8) cached.clear();
    cached.set(source, digests);
  }
  return digests;
}
