import type { ContentfulStatusCode } from "hono/utils/http-status";

/**
 * The API's errors: always JSON `{ "error": { "code", "message" } }` with the right status, never a
 * stack trace. Anything that is not an ApiError becomes a 500 with a generic message (and is logged).
 */
export class ApiError extends Error {
  readonly status: ContentfulStatusCode;
  readonly code: string;
  readonly headers: Record<string, string>;
  constructor(status: ContentfulStatusCode, code: string, message: string, headers: Record<string, string> = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.headers = headers;
  }
}

export function errorBody(code: string, message: string) {
  return { error: { code, message } };
}
