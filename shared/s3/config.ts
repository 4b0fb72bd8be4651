import { z } from "zod";
import { parseContract } from "../contracts/parse.ts";
import { EdgetuneError } from "../errors.ts";

/**
 * How to reach the bucket. In AWS everything but `bucket` comes from the environment (region and the
 * instance role); locally `endpoint` points at the emulator and `forcePathStyle` is on.
 */
export const s3ConfigSchema = z.object({
  bucket: z.string().min(3),
  region: z.string().min(1).default("us-east-1"),
  endpoint: z.url().optional(),
  forcePathStyle: z.boolean().default(false),
  credentials: z.object({ accessKeyId: z.string().min(1), secretAccessKey: z.string().min(1), sessionToken: z.string().optional() }).optional(),
});
export type S3Config = z.output<typeof s3ConfigSchema>;

/** Reads `EDGETUNE_BUCKET`, `AWS_REGION`, `EDGETUNE_S3_ENDPOINT`, `AWS_ACCESS_KEY_ID`, … */
export function s3ConfigFromEnv(env: Record<string, string | undefined>, overrides: Partial<S3Config> = {}): S3Config {
  const endpoint = env.EDGETUNE_S3_ENDPOINT || undefined;
  // The one setting without a default: say which variable to set rather than what the schema saw.
  if (!(overrides.bucket ?? env.EDGETUNE_BUCKET))
    throw new EdgetuneError("no_bucket", "No S3 bucket is set: set EDGETUNE_BUCKET (or pass --bucket <name> to edgetune).");
  const accessKeyId = env.AWS_ACCESS_KEY_ID;
  const secretAccessKey = env.AWS_SECRET_ACCESS_KEY;
  return parseContract(
    s3ConfigSchema,
    {
      bucket: env.EDGETUNE_BUCKET,
      region: env.AWS_REGION || env.AWS_DEFAULT_REGION || undefined,
      endpoint,
      forcePathStyle: endpoint !== undefined,
      credentials: accessKeyId && secretAccessKey ? { accessKeyId, secretAccessKey, sessionToken: env.AWS_SESSION_TOKEN } : undefined,
      ...overrides,
    },
    "S3 configuration (EDGETUNE_BUCKET, AWS_REGION, EDGETUNE_S3_ENDPOINT)",
  );
}
