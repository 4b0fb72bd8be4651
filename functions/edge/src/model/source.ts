import { AwsClient } from "aws4fetch";
import type { FolderLister, FolderListing } from "#shared/catalog.ts";
import { ObjectTooLargeError } from "#shared/s3/store.ts";
import { readCappedBody } from "../http/capped-body.ts";

/**
 * Where the worker reads models from: the training job's S3 bucket, signed with SigV4 using
 * read-only credentials (Worker secrets), or — for public or R2-fronted buckets — a plain HTTPS base
 * URL. Only keys under `models/` are ever requested, and only from this configured origin: nothing a
 * request carries can make the worker fetch another URL.
 */
export interface ConditionalResult {
  status: 200 | 304 | 404;
  bytes?: Uint8Array;
  etag?: string;
}

export interface ModelSource extends FolderLister {
  /** GET with If-None-Match: 304 when the object still has `etag`. `maxBytes`: as `get`'s. */
  getIfChanged(key: string, etag?: string, options?: { maxBytes?: number }): Promise<ConditionalResult>;
}

export class SourceError extends Error {
  readonly status?: number;
  constructor(message: string, status?: number) {
    super(message);
    this.status = status;
  }
}

export interface SourceConfig {
  S3_BUCKET?: string;
  S3_REGION?: string;
  S3_ENDPOINT?: string;
  MODELS_BASE_URL?: string;
  AWS_ACCESS_KEY_ID?: string;
  AWS_SECRET_ACCESS_KEY?: string;
}

/** Listing needs the S3 API: a plain HTTPS origin (MODELS_BASE_URL) serves files, not folder listings. */
export class ListingUnavailableError extends SourceError {}

/**
 * The store refused the worker's credentials (S3 401/403: a rotated, deleted or expired key, a wrong
 * secret, or a policy that no longer lets it read `models/`). Not "model not found": retrying will
 * not help until the Worker's secrets are set again.
 */
export class StoreAccessDeniedError extends SourceError {
  readonly code = "store_access_denied";
  constructor(what: string, s3Code: string | undefined, status: number) {
    super(
      `the model store refused the worker's credentials for ${what} (HTTP ${status}${s3Code ? ` ${s3Code}` : ""}): set the Worker's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY secrets to the stack's edge key again (npm run deploy does)`,
      status,
    );
  }
}

/** The `<Code>` of an S3 error document, if the body is one. */
async function s3ErrorCode(res: Response): Promise<string | undefined> {
  const text = await res.text().catch(() => "");
  return /<Code>([A-Za-z]+)<\/Code>/.exec(text)?.[1];
}

export function createModelSource(env: SourceConfig): ModelSource {
  if (env.MODELS_BASE_URL) {
    const base = env.MODELS_BASE_URL.replace(/\/$/, "");
    return new HttpSource(
      (key) => `${base}/${key}`,
      (req) => fetch(req),
      null,
    );
  }
  const { bucketUrl, send } = signedBucket(env);
  return new HttpSource((key) => `${bucketUrl}/${encodeKey(key)}`, send, bucketUrl);
}

/** The bucket's URL and a SigV4-signing fetch, from the worker's S3 settings and secrets. */
export function signedBucket(env: SourceConfig): { bucketUrl: string; send: (req: Request, init?: RequestInit) => Promise<Response> } {
  if (!env.S3_BUCKET) throw new SourceError("S3_BUCKET (or MODELS_BASE_URL) is not configured");
  const region = env.S3_REGION || "us-east-1";
  const bucketUrl = env.S3_ENDPOINT ? `${env.S3_ENDPOINT.replace(/\/$/, "")}/${env.S3_BUCKET}` : `https://${env.S3_BUCKET}.s3.${region}.amazonaws.com`;
  if (!env.AWS_ACCESS_KEY_ID || !env.AWS_SECRET_ACCESS_KEY) throw new SourceError("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY secrets are not set");
  const aws = new AwsClient({ accessKeyId: env.AWS_ACCESS_KEY_ID, secretAccessKey: env.AWS_SECRET_ACCESS_KEY, region, service: "s3", retries: 2 });
  // aws4fetch rebuilds the request from its method, URL, headers and body: a signal must come in `init`.
  return { bucketUrl, send: (req, init) => aws.fetch(req, init) };
}

export function encodeKey(key: string): string {
  return key.split("/").map(encodeURIComponent).join("/");
}

class HttpSource implements ModelSource {
  private readonly urlOf: (key: string) => string;
  private readonly send: (req: Request) => Promise<Response>;
  /** The bucket's URL for ListObjectsV2, or null where the origin is not the S3 API. */
  private readonly bucketUrl: string | null;

  constructor(urlOf: (key: string) => string, send: (req: Request) => Promise<Response>, bucketUrl: string | null) {
    this.urlOf = urlOf;
    this.send = send;
    this.bucketUrl = bucketUrl;
  }

  /** ListObjectsV2 with delimiter "/"; only prefixes under `models/` are ever asked for (catalog.ts). */
  async *listFolders(prefix: string, options: FolderListing = {}): AsyncIterable<string> {
    if (!this.bucketUrl) throw new ListingUnavailableError("listing models needs the S3 API (S3_BUCKET); MODELS_BASE_URL serves files only");
    let token: string | undefined;
    do {
      const query = new URLSearchParams({ "list-type": "2", prefix, delimiter: "/" });
      if (options.startAfter) query.set("start-after", options.startAfter);
      if (token) query.set("continuation-token", token);
      let res: Response;
      try {
        res = await this.send(new Request(`${this.bucketUrl}/?${query}`));
      } catch (e) {
        throw new SourceError(`model storage unreachable (${e instanceof Error ? e.message : e})`);
      }
      if (res.status === 401 || res.status === 403) {
        const code = await s3ErrorCode(res);
        // A key that is refused outright (InvalidAccessKeyId, SignatureDoesNotMatch, ExpiredToken…) is
        // not a missing permission: say so rather than "deploy again to gain s3:ListBucket".
        if (code !== "AccessDenied") throw new StoreAccessDeniedError(`a listing of ${prefix}`, code, res.status);
        // Credentials made before the console may read but not list: retrying will not help.
        throw new ListingUnavailableError("the worker's S3 credentials may not list models/ (deploy the stack again: the edge key gains s3:ListBucket)");
      }
      if (!res.ok) {
        await res.body?.cancel();
        throw new SourceError(`model storage answered HTTP ${res.status} to a listing of ${prefix}`, res.status);
      }
      const page = parseListing(await res.text());
      yield* page.folders;
      token = page.next;
    } while (token);
  }

  /** True if a listing of `key` is allowed and finds nothing; false if it is refused or finds the key. */
  private async missing(key: string): Promise<boolean> {
    const query = new URLSearchParams({ "list-type": "2", prefix: key, "max-keys": "1" });
    const res = await this.send(new Request(`${this.bucketUrl}/?${query}`)).catch(() => null);
    if (!res?.ok) {
      await res?.body?.cancel();
      return false;
    }
    return !parseListing(await res.text()).keys.includes(key);
  }

  async get(key: string, options?: { maxBytes?: number }): Promise<Uint8Array | null> {
    const r = await this.getIfChanged(key, undefined, options);
    return r.status === 200 ? (r.bytes as Uint8Array) : null;
  }

  async getIfChanged(key: string, etag?: string, options: { maxBytes?: number } = {}): Promise<ConditionalResult> {
    const headers: Record<string, string> = {};
    if (etag) headers["if-none-match"] = etag;
    let res: Response;
    try {
      res = await this.send(new Request(this.urlOf(key), { headers }));
    } catch (e) {
      throw new SourceError(`model storage unreachable (${e instanceof Error ? e.message : e})`);
    }
    if (res.status === 304) return { status: 304, etag };
    if (res.status === 404) {
      await res.body?.cancel();
      return { status: 404 };
    }
    if (res.status === 401 || res.status === 403) {
      // A public origin (MODELS_BASE_URL) answers 403 for a missing key: nothing was refused.
      if (!this.bucketUrl) {
        await res.body?.cancel();
        if (res.status === 403) return { status: 404 };
        throw new StoreAccessDeniedError(key, undefined, res.status);
      }
      const code = await s3ErrorCode(res);
      // S3 also answers 403 AccessDenied for a missing key when the credentials may not list where it
      // would be: a listing of that very key tells a missing object from a refused key.
      if (code === "AccessDenied" && (await this.missing(key))) return { status: 404 };
      throw new StoreAccessDeniedError(key, code, res.status);
    }
    if (!res.ok) {
      await res.body?.cancel();
      throw new SourceError(`model storage answered HTTP ${res.status} for ${key}`, res.status);
    }
    return { status: 200, bytes: await readBody(res, key, options.maxBytes), etag: res.headers.get("etag") ?? undefined };
  }
}

/** A response's body, bounded by `maxBytes` when given (an object larger than its listing says is never held whole). */
function readBody(res: Response, key: string, maxBytes: number | undefined): Promise<Uint8Array> {
  if (maxBytes === undefined) return res.arrayBuffer().then((b) => new Uint8Array(b));
  return readCappedBody(res, maxBytes, () => new ObjectTooLargeError(key, maxBytes));
}

/** One page of a ListObjectsV2 answer: its keys, its folders (CommonPrefixes, with a delimiter), and the token of the next page. */
export function parseListing(xml: string): { keys: string[]; folders: string[]; next: string | undefined } {
  const keys = [...xml.matchAll(/<Key>([\s\S]*?)<\/Key>/g)].map((m) => unescapeXml(m[1] as string));
  const folders = (xml.match(/<CommonPrefixes>[\s\S]*?<\/CommonPrefixes>/g) ?? []).flatMap((block) => {
    const p = /<Prefix>([\s\S]*?)<\/Prefix>/.exec(block)?.[1];
    return p ? [unescapeXml(p)] : [];
  });
  const next = /<IsTruncated>true<\/IsTruncated>/.test(xml)
    ? unescapeXml(/<NextContinuationToken>([\s\S]*?)<\/NextContinuationToken>/.exec(xml)?.[1] ?? "")
    : undefined;
  return { keys, folders, next };
}

/** The five predefined XML entities and numeric references: all S3 puts in a listing. */
function unescapeXml(s: string): string {
  return s.replace(/&(amp|lt|gt|quot|apos|#\d+|#x[0-9a-fA-F]+);/g, (_, e: string) => {
    if (e.startsWith("#x")) return String.fromCodePoint(Number.parseInt(e.slice(2), 16));
    if (e.startsWith("#")) return String.fromCodePoint(Number(e.slice(1)));
    return { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'" }[e] as string;
  });
}
