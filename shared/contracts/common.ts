import { z } from "zod";

/** Lower-case hex sha256, as computed by `sha256Hex`. */
export const sha256Schema = z.string().regex(/^[0-9a-f]{64}$/, "must be a lower-case hex sha256 (64 characters)");

/** Names of datasets and models: one S3 path segment, safe in URLs. */
export const nameSchema = z
  .string()
  .regex(/^[a-z0-9][a-z0-9._-]{0,62}$/, "must be 1–63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit");

/** Model version ids: derived from the dataset fingerprint and the training config (see `versionId`). */
export const versionSchema = z.string().regex(/^v[0-9a-f]{12}$/, "must look like v0123456789ab");

/** Image sizes the bases are trained and benchmarked at (MobileNetV2's published resolutions). */
export const IMAGE_SIZES = [96, 128, 160, 192, 224] as const;
export type ImageSize = (typeof IMAGE_SIZES)[number];
export const imageSizeSchema = z.union(IMAGE_SIZES.map((s) => z.literal(s)) as [z.ZodLiteral<96>, ...z.ZodLiteral<ImageSize>[]]);

export const STRATEGIES = ["head", "finetune"] as const;
export type Strategy = (typeof STRATEGIES)[number];
export const strategySchema = z.enum(STRATEGIES);
