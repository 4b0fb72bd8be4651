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
  return bearerAuth<{ Bindings: Env }>({
    realm: "edgetune",
    verifyToken: async (token, c) => {
      // Hono's timingSafeEqual also compares the raw strings, in time that grows with the longer one;
      // comparing SHA-256 digests (always 64 characters) keeps a key's length from leaking as well.
      const presented = await sha256(token);
      if (presented === null) return false;
      let ok = false;
      // No early exit: the time does not depend on which key matched either.
      for (const key of await keyDigests(c.env.API_KEYS ?? "")) if (await timingSafeEqual(key, presented)) ok = true;
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

/** Digests of the configured keys, computed again only when the secret changes. */
let cached: { source: string; digests: Promise<string[]> } | undefined;
function keyDigests(source: string): Promise<string[]> {
  if (cached?.source !== source) {
    const keys = source
      .split(",")
      .map((k) => k.trim())
      .filter(Boolean);
    const digests = Promise.all(keys.map(sha256)).then((d) => d.filter((x): x is string => x !== null));
    cached = { source, digests };
  }
  return cached.digests;
}
