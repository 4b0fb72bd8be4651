import { EdgetuneError } from "../errors.ts";

/**
 * The narrow view of object storage that the contracts need. The training job implements it with
 * `@aws-sdk/client-s3` (`shared/s3/client.ts`), the edge worker with signed `fetch` (aws4fetch).
 */
export interface ObjectReader {
  /**
   * The object's bytes, or null if there is no such key. `maxBytes`: never hold more than that — a larger
   * object is refused with `ObjectTooLargeError` while it is read (a size from a listing or a HEAD may be
   * stale by then: whoever may write the key can replace it in between).
   */
  get(key: string, options?: { maxBytes?: number }): Promise<Uint8Array | null>;
}

/** An object larger than its reader allows (under captures/: forged, or not the edge's). */
export class ObjectTooLargeError extends EdgetuneError {
  constructor(key: string, maxBytes: number) {
    super("object_too_large", `${key} is larger than the ${maxBytes} bytes allowed for it; it was not read`);
  }
}

export interface ObjectStore extends ObjectReader {
  /** `metadata`: S3 user metadata (x-amz-meta-*), e.g. a captured image's provenance. */
  put(key: string, body: Uint8Array | string, contentType?: string, metadata?: Record<string, string>): Promise<{ etag: string }>;
  /** Writes only if the key does not exist yet; returns false if it did (S3 `If-None-Match: *`). */
  putIfAbsent(key: string, body: Uint8Array | string, contentType?: string): Promise<boolean>;
  /** Writes only if the key still has ETag `etag` (S3 `If-Match`): a compare-and-swap; false if it changed or is gone. */
  putIfMatch(key: string, body: Uint8Array | string, etag: string, contentType?: string): Promise<boolean>;
  head(key: string): Promise<{ etag: string; size: number; metadata?: Record<string, string> } | null>;
  /** Every key under `prefix`, in lexical order, with its ETag, size and (where the server says) last write. */
  list(prefix: string): AsyncIterable<{ key: string; etag: string; size: number; modified?: string }>;
  /** The immediate sub-folders of `prefix`, as full prefixes ending in "/" (a delimiter listing), after `startAfter` if given. */
  listFolders(prefix: string, options?: { startAfter?: string }): AsyncIterable<string>;
  delete(keys: string[]): Promise<void>;
  /** Deletes only if the key still has ETag `etag` (S3 `If-Match` on DeleteObject); false if it changed or is gone. */
  deleteIfMatch(key: string, etag: string): Promise<boolean>;
}

export async function getText(store: ObjectReader, key: string): Promise<string | null> {
  const bytes = await store.get(key);
  return bytes === null ? null : new TextDecoder().decode(bytes);
}
