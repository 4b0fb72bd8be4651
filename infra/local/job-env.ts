import type { S3Config } from "#shared/s3/config.ts";

/** The environment the Batch container gets from the stack, pointed at a local S3 server instead. */
export function jobEnvironment(s3: S3Config, extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return {
    ...process.env,
    EDGETUNE_BUCKET: s3.bucket,
    EDGETUNE_S3_ENDPOINT: s3.endpoint ?? "",
    AWS_REGION: s3.region,
    AWS_ACCESS_KEY_ID: s3.credentials?.accessKeyId ?? "local",
    AWS_SECRET_ACCESS_KEY: s3.credentials?.secretAccessKey ?? "local-secret",
    ...extra,
  };
}
