/** What every command group shares: number parsing for flags, the S3 store from the global flags, dataset references. */
import { InvalidArgumentError } from "commander";
import { InvalidOptionError } from "#shared/errors.ts";
import { datasetNameFromManifestKey } from "#shared/keys.ts";
import { S3ObjectStore } from "#shared/s3/client.ts";
import { s3ConfigFromEnv } from "#shared/s3/config.ts";

/** The program's global flags (cli.ts), which every command reads with optsWithGlobals(). */
export type Globals = { bucket?: string; endpoint?: string };

export const int = (name: string) => (v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n)) throw new InvalidArgumentError(`${name} must be a whole number`);
  return n;
};
export const num = (name: string) => (v: string) => {
  const n = Number(v);
  if (!Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number`);
  return n;
};

export function storeFrom(opts: Globals): S3ObjectStore {
  const overrides: Record<string, unknown> = {};
  if (opts.bucket) overrides.bucket = opts.bucket;
  if (opts.endpoint) Object.assign(overrides, { endpoint: opts.endpoint, forcePathStyle: true });
  return new S3ObjectStore(s3ConfigFromEnv(process.env, overrides));
}

/**
 * `name`; `s3://bucket/datasets/name/` (which also sets the bucket); `datasets/name/manifest.json`
 * (the key an S3 trigger passes); or `*` for every complete dataset (the nightly schedule).
 */
export function datasetRef(value: string, opts: { bucket?: string }): string {
  const url = /^s3:\/\/([^/]+)\/datasets\/([^/]+)\/?$/.exec(value);
  if (url) {
    opts.bucket = url[1];
    return url[2] as string;
  }
  if (value.startsWith("s3://"))
    throw new InvalidOptionError("--dataset", value, ["a name", "s3://<bucket>/datasets/<name>/", "datasets/<name>/manifest.json"]);
  return datasetNameFromManifestKey(value) ?? value;
}

/** A JSON round trip: drops the fields that unset flags left undefined, so the input says only what was given. */
export function clean<T>(o: T): T {
  return JSON.parse(JSON.stringify(o)) as T;
}
