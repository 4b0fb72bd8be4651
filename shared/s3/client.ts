import { STATUS_CODES } from "node:http";
import {
  DeleteObjectCommand,
  DeleteObjectsCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  type ListObjectsV2CommandOutput,
  NoSuchKey,
  NotFound,
  PutObjectCommand,
  S3Client,
  S3ServiceException,
} from "@aws-sdk/client-s3";
import { Upload } from "@aws-sdk/lib-storage";
import { EdgetuneError } from "../errors.ts";
import type { S3Config } from "./config.ts";
import { type ObjectStore, ObjectTooLargeError } from "./store.ts";

const DOING = { GET: "Reading", PUT: "Storing", HEAD: "Looking up", LIST: "Listing", DELETE: "Deleting" } as const;

/**
 * An S3 failure that survived the SDK's retries (network down, access denied, bucket missing), said in
 * plain words: what was being done, to which key, and the server's answer. An answer that is not S3's
 * XML (a proxy's or an emulator's error page) surfaces from the SDK as an "XML parse error"; its HTTP
 * status is what the person needs.
 */
export class StorageError extends EdgetuneError {
  constructor(operation: keyof typeof DOING, key: string, cause: unknown) {
    const status = (cause as { $metadata?: { httpStatusCode?: number } } | undefined)?.$metadata?.httpStatusCode;
    const answered = status ? `the storage server answered HTTP ${status} ${STATUS_CODES[status] ?? ""}`.trimEnd() : "";
    const network = (cause as { code?: string } | undefined)?.code;
    const detail =
      cause instanceof S3ServiceException && !/parse error|Deserialization/i.test(cause.message)
        ? `${answered} (${cause.name})`
        : answered ||
          (network && /^E[A-Z]+$/.test(network)
            ? `the storage server could not be reached (${network})`
            : cause instanceof Error
              ? cause.message
              : String(cause));
    super("storage_error", `${DOING[operation]} ${key} in the bucket failed (S3 ${operation}): ${detail}.`, { cause });
  }
}

/**
 * Objects above this go up as a multipart upload (checkpoints, bases, feature packs, artifacts): each
 * part is retried on its own, and no single request is large (S3-compatible servers cap a request:
 * the local one at about 11 MiB). Parts must be ≥ 5 MiB but the last.
 */
export const MULTIPART_THRESHOLD = 8 * 1024 * 1024;

/** The S3 client for a configuration; retries transient faults with exponential backoff (SDK standard mode). */
export function createS3Client(config: S3Config): S3Client {
  return new S3Client({
    region: config.region,
    endpoint: config.endpoint,
    forcePathStyle: config.forcePathStyle,
    credentials: config.credentials,
    maxAttempts: 5,
    retryMode: "standard",
  });
}

/** `ObjectStore` over one bucket. */
export class S3ObjectStore implements ObjectStore {
  readonly client: S3Client;
  readonly bucket: string;

  constructor(config: S3Config, client: S3Client = createS3Client(config)) {
    this.client = client;
    this.bucket = config.bucket;
  }

  async get(key: string, options: { maxBytes?: number } = {}): Promise<Uint8Array | null> {
    const { maxBytes } = options;
    // Capped: ask for one byte more than allowed, so an object replaced by a larger one after it was
    // listed is refused without being downloaded (S3 answers the first maxBytes + 1 bytes at most).
    const range = maxBytes === undefined ? undefined : `bytes=0-${maxBytes}`;
    try {
      const res = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: key, Range: range }));
      if (maxBytes !== undefined && totalOf(res.ContentRange, res.ContentLength) > maxBytes) {
        await res.Body?.transformToWebStream().cancel();
        throw new ObjectTooLargeError(key, maxBytes);
      }
      if (!res.Body) return new Uint8Array();
      const bytes = await res.Body.transformToByteArray();
      // A server that ignored the Range header sent everything: still refused, if no longer unread.
      if (maxBytes !== undefined && bytes.length > maxBytes) throw new ObjectTooLargeError(key, maxBytes);
      return bytes;
    } catch (e) {
      if (e instanceof ObjectTooLargeError) throw e;
      if (e instanceof NoSuchKey || isStatus(e, 404)) return null;
      // 416: a range of an empty object.
      if (range !== undefined && isStatus(e, 416)) return new Uint8Array();
      throw new StorageError("GET", key, e);
    }
  }

  async put(key: string, body: Uint8Array | string, contentType?: string, metadata?: Record<string, string>): Promise<{ etag: string }> {
    const params = { Bucket: this.bucket, Key: key, Body: body, ContentType: contentType ?? guessContentType(key), Metadata: metadata };
    try {
      const size = typeof body === "string" ? Buffer.byteLength(body) : body.byteLength;
      if (size > MULTIPART_THRESHOLD) {
        // lib-storage aborts the upload (and its parts) when a part fails for good.
        const res = await new Upload({ client: this.client, params, partSize: MULTIPART_THRESHOLD, queueSize: 2, leavePartsOnError: false }).done();
        return { etag: res.ETag ?? "" };
      }
      const res = await this.client.send(new PutObjectCommand(params));
      return { etag: res.ETag ?? "" };
    } catch (e) {
      throw new StorageError("PUT", key, e);
    }
  }

  async putIfAbsent(key: string, body: Uint8Array | string, contentType?: string): Promise<boolean> {
    // S3 conditional writes. Emulators that ignore the header are covered by the HEAD check before it.
    if (await this.head(key)) return false;
    try {
      await this.client.send(
        new PutObjectCommand({ Bucket: this.bucket, Key: key, Body: body, ContentType: contentType ?? guessContentType(key), IfNoneMatch: "*" }),
      );
      return true;
    } catch (e) {
      if (isStatus(e, 412) || isStatus(e, 409)) return false;
      throw new StorageError("PUT", key, e);
    }
  }

  async putIfMatch(key: string, body: Uint8Array | string, etag: string, contentType?: string): Promise<boolean> {
    try {
      await this.client.send(
        new PutObjectCommand({ Bucket: this.bucket, Key: key, Body: body, ContentType: contentType ?? guessContentType(key), IfMatch: etag }),
      );
      return true;
    } catch (e) {
      // 412: another writer changed it; 404: it was deleted; 409: a concurrent conditional write won.
      if (isStatus(e, 412) || isStatus(e, 404) || isStatus(e, 409)) return false;
      throw new StorageError("PUT", key, e);
    }
  }

  async head(key: string): Promise<{ etag: string; size: number; metadata?: Record<string, string> } | null> {
    try {
      const res = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: key }));
      return { etag: res.ETag ?? "", size: res.ContentLength ?? 0, metadata: res.Metadata };
    } catch (e) {
      if (e instanceof NotFound || isStatus(e, 404)) return null;
      throw new StorageError("HEAD", key, e);
    }
  }

  async *list(prefix: string): AsyncIterable<{ key: string; etag: string; size: number; modified?: string }> {
    let token: string | undefined;
    do {
      let res: ListObjectsV2CommandOutput;
      try {
        res = await this.client.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: prefix, ContinuationToken: token }));
      } catch (e) {
        throw new StorageError("LIST", prefix, e);
      }
      for (const o of res.Contents ?? []) {
        if (o.Key) yield { key: o.Key, etag: o.ETag ?? "", size: o.Size ?? 0, modified: o.LastModified?.toISOString() };
      }
      token = res.IsTruncated ? res.NextContinuationToken : undefined;
    } while (token);
  }

  async *listFolders(prefix: string, options: { startAfter?: string } = {}): AsyncIterable<string> {
    let token: string | undefined;
    do {
      let res: ListObjectsV2CommandOutput;
      try {
        res = await this.client.send(
          new ListObjectsV2Command({ Bucket: this.bucket, Prefix: prefix, Delimiter: "/", ContinuationToken: token, StartAfter: options.startAfter }),
        );
      } catch (e) {
        throw new StorageError("LIST", prefix, e);
      }
      for (const p of res.CommonPrefixes ?? []) {
        if (p.Prefix) yield p.Prefix;
      }
      token = res.IsTruncated ? res.NextContinuationToken : undefined;
    } while (token);
  }

  async delete(keys: string[]): Promise<void> {
    for (let i = 0; i < keys.length; i += 1000) {
      const chunk = keys.slice(i, i + 1000);
      let failed: { Key?: string; Code?: string }[] = [];
      try {
        const res = await this.client.send(new DeleteObjectsCommand({ Bucket: this.bucket, Delete: { Objects: chunk.map((Key) => ({ Key })), Quiet: true } }));
        failed = res.Errors ?? [];
      } catch (e) {
        throw new StorageError("DELETE", chunk[0] ?? "", e);
      }
      // A batch delete answers 200 and lists the keys it could not delete: each is a failure too.
      if (failed.length > 0) throw new StorageError("DELETE", failed[0]?.Key ?? "", new Error(`${failed.length} key(s) not deleted (${failed[0]?.Code})`));
    }
  }

  async deleteIfMatch(key: string, etag: string): Promise<boolean> {
    try {
      await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: key, IfMatch: etag }));
      return true;
    } catch (e) {
      // 412: another writer changed it; 404: it is gone already.
      if (isStatus(e, 412) || isStatus(e, 404)) return false;
      throw new StorageError("DELETE", key, e);
    }
  }
}

/** An object's whole size from a ranged answer ("bytes 0-99/5000"), else the length of what was sent. */
function totalOf(contentRange: string | undefined, contentLength: number | undefined): number {
  const total = contentRange?.match(/\/(\d+)$/)?.[1];
  return total === undefined ? (contentLength ?? 0) : Number(total);
}

function isStatus(e: unknown, status: number): boolean {
  return e instanceof S3ServiceException && e.$metadata.httpStatusCode === status;
}

function guessContentType(key: string): string {
  if (key.endsWith(".json")) return "application/json";
  if (key.endsWith(".html")) return "text/html; charset=utf-8";
  return "application/octet-stream";
}
