import { isCaptureKey } from "#shared/keys.ts";
import { readCappedBody } from "../http/capped-body.ts";
import { encodeKey, parseListing, type SourceConfig, signedBucket } from "../model/source.ts";

/**
 * The worker's only way to write to the bucket. Every key is checked with `isCaptureKey` before a request
 * is built — a key outside `captures/<model>/` throws, whatever produced it — and the IAM policy of the
 * edge's credentials says the same (infra/constructs/edge-credentials.ts). Reads and listings here are
 * of `captures/` too (the quota, the review queue).
 */
export class CaptureKeyError extends Error {}

export interface CaptureStore {
  /**
   * PUT; `ifMatch` makes it a compare-and-swap, `ifNoneMatch` a create: false when the condition failed.
   * `signal` ends the request early (a capture's own deadline); every request also has REQUEST_DEADLINE_MS.
   */
  put(key: string, body: Uint8Array | string, contentType: string, condition?: { ifMatch?: string; ifNoneMatch?: "*" }, signal?: AbortSignal): Promise<boolean>;
  /**
   * GET, read up to `maxBytes` (default MAX_READ_BYTES): a larger object is refused with
   * CaptureObjectTooLargeError before its body is read (or as soon as it passes the cap). Everything under
   * captures/ may have been written by whoever holds the edge's key: nothing read from there is held unbounded.
   */
  get(key: string, signal?: AbortSignal, maxBytes?: number): Promise<{ bytes: Uint8Array; etag: string; contentType: string } | null>;
  /** Keys under a prefix, in lexical order, at most `limit`; only those after `startAfter` when given. */
  list(prefix: string, limit: number, startAfter?: string): Promise<string[]>;
  /** The sub-folders of a prefix (a delimiter listing), e.g. the days under captures/<model>/images/. */
  listFolders(prefix: string): Promise<string[]>;
}

export class CaptureStoreError extends Error {}
/** An object under captures/ larger than its reader allows (forged, or not the edge's). */
export class CaptureObjectTooLargeError extends Error {}

/** The default cap of one read: the largest file the edge writes there (a capture's PNG at maxSide 2048) fits. */
export const MAX_READ_BYTES = 16 * 1024 * 1024;

const REQUEST_DEADLINE_MS = 10_000;

export function assertCaptureKey(key: string): void {
  if (!isCaptureKey(key)) throw new CaptureKeyError(`refusing to touch ${JSON.stringify(key)}: the edge writes under captures/<model>/ only`);
}

/** Null where the worker reads models from a plain HTTPS origin (no credentials to write with). */
export function createCaptureStore(env: SourceConfig): CaptureStore | null {
  if (env.MODELS_BASE_URL || !env.S3_BUCKET || !env.AWS_ACCESS_KEY_ID) return null;
  const { bucketUrl, send } = signedBucket(env);
  const call = async (req: Request, signal?: AbortSignal) => {
    try {
      // A deadline on every request: a hanging bucket must not keep capture work (and its image) alive.
      return await send(req, { signal: signal ?? AbortSignal.timeout(REQUEST_DEADLINE_MS) });
    } catch (e) {
      throw new CaptureStoreError(`capture storage unreachable (${e instanceof Error ? e.message : e})`);
    }
  };
  /** One ListObjectsV2 page under a captures/<model>/<kind>/ prefix (refused for any other prefix). */
  const listPage = async (prefix: string, params: Record<string, string>) => {
    if (!isCaptureKey(prefix, true)) throw new CaptureKeyError(`refusing to list ${JSON.stringify(prefix)}: not a captures/<model>/<kind>/ prefix`);
    const res = await call(new Request(`${bucketUrl}/?${new URLSearchParams({ "list-type": "2", prefix, ...params })}`));
    if (!res.ok) {
      await res.body?.cancel();
      throw new CaptureStoreError(`capture storage answered HTTP ${res.status} to a listing`);
    }
    return parseListing(await res.text());
  };
  return {
    async put(key, body, contentType, condition = {}, signal) {
      assertCaptureKey(key);
      const headers: Record<string, string> = { "content-type": contentType };
      if (condition.ifMatch) headers["if-match"] = condition.ifMatch;
      if (condition.ifNoneMatch) headers["if-none-match"] = condition.ifNoneMatch;
      const res = await call(new Request(`${bucketUrl}/${encodeKey(key)}`, { method: "PUT", headers, body }), signal);
      await res.body?.cancel();
      if (res.status === 412 || res.status === 409) return false;
      if (!res.ok) throw new CaptureStoreError(`capture storage answered HTTP ${res.status} to a write`);
      return true;
    },
    async get(key, signal, maxBytes = MAX_READ_BYTES) {
      assertCaptureKey(key);
      const res = await call(new Request(`${bucketUrl}/${encodeKey(key)}`), signal);
      if (res.status === 404 || res.status === 403) {
        await res.body?.cancel();
        return null;
      }
      if (!res.ok) {
        await res.body?.cancel();
        throw new CaptureStoreError(`capture storage answered HTTP ${res.status} to a read`);
      }
      return {
        bytes: await readCappedBody(res, maxBytes, () => new CaptureObjectTooLargeError(`${key} is larger than the ${maxBytes} bytes allowed for it`)),
        etag: res.headers.get("etag") ?? "",
        contentType: res.headers.get("content-type") ?? "application/octet-stream",
      };
    },
    async list(prefix, limit, startAfter) {
      const out: string[] = [];
      let token: string | undefined;
      do {
        const page = await listPage(prefix, {
          "max-keys": String(Math.min(1000, limit - out.length)),
          ...(token ? { "continuation-token": token } : startAfter ? { "start-after": startAfter } : {}),
        });
        out.push(...page.keys);
        token = page.next;
      } while (token && out.length < limit);
      return out.slice(0, limit);
    },
    async listFolders(prefix) {
      return (await listPage(prefix, { delimiter: "/" })).folders;
    },
  };
}
