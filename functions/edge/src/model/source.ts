import { AwsClient } from "aws4fetch";
import type { ObjectReader } from "../../../../shared/s3/store.ts";

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

export interface ModelSource extends ObjectReader {
  /** GET with If-None-Match: 304 when the object still has `etag`. */
  getIfChanged(key: string, etag?: string): Promise<ConditionalResult>;
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

export function createModelSource(env: SourceConfig): ModelSource {
  if (env.MODELS_BASE_URL) {
    const base = env.MODELS_BASE_URL.replace(/\/$/, "");
    return new HttpSource(
      (key) => `${base}/${key}`,
      (req) => fetch(req),
    );
  }
  if (!env.S3_BUCKET) throw new SourceError("S3_BUCKET (or MODELS_BASE_URL) is not configured");
  const region = env.S3_REGION || "us-east-1";
  const urlOf = env.S3_ENDPOINT
    ? (key: string) => `${env.S3_ENDPOINT?.replace(/\/$/, "")}/${env.S3_BUCKET}/${encodeKey(key)}`
    : (key: string) => `https://${env.S3_BUCKET}.s3.${region}.amazonaws.com/${encodeKey(key)}`;
  if (!env.AWS_ACCESS_KEY_ID || !env.AWS_SECRET_ACCESS_KEY) throw new SourceError("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY secrets are not set");
  const aws = new AwsClient({ accessKeyId: env.AWS_ACCESS_KEY_ID, secretAccessKey: env.AWS_SECRET_ACCESS_KEY, region, service: "s3", retries: 2 });
  return new HttpSource(urlOf, (req) => aws.fetch(req));
}

function encodeKey(key: string): string {
  return key.split("/").map(encodeURIComponent).join("/");
}

class HttpSource implements ModelSource {
  private readonly urlOf: (key: string) => string;
  private readonly send: (req: Request) => Promise<Response>;

  constructor(urlOf: (key: string) => string, send: (req: Request) => Promise<Response>) {
    this.urlOf = urlOf;
    this.send = send;
  }

  async get(key: string): Promise<Uint8Array | null> {
    const r = await this.getIfChanged(key);
    return r.status === 200 ? (r.bytes as Uint8Array) : null;
  }

  async getIfChanged(key: string, etag?: string): Promise<ConditionalResult> {
    const headers: Record<string, string> = {};
    if (etag) headers["if-none-match"] = etag;
    let res: Response;
    try {
      res = await this.send(new Request(this.urlOf(key), { headers }));
    } catch (e) {
      throw new SourceError(`model storage unreachable (${e instanceof Error ? e.message : e})`);
    }
    if (res.status === 304) return { status: 304, etag };
    if (res.status === 404 || res.status === 403) {
      // S3 answers 403 for a missing key when the credentials may not list the bucket.
      await res.body?.cancel();
      return { status: 404 };
    }
    if (!res.ok) {
      await res.body?.cancel();
      throw new SourceError(`model storage answered HTTP ${res.status} for ${key}`, res.status);
    }
    return { status: 200, bytes: new Uint8Array(await res.arrayBuffer()), etag: res.headers.get("etag") ?? undefined };
  }
}
