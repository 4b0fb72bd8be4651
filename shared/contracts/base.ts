import { z } from "zod";
import { NORMALIZATIONS, type Normalization } from "../preprocess.ts";
import { imageSizeSchema, sha256Schema } from "./common.ts";

/**
 * Base model contract: `bases/<id>/base.json` beside a Keras-style tfjs LayersModel (`model.json` +
 * weight shards). The training job cuts the model at `featureLayer` and pools it to a vector.
 */
export const baseIdSchema = z.string().regex(/^[a-z0-9][a-z0-9._-]{0,80}$/, "must be 1–81 characters of a-z, 0-9, '.', '_' or '-'");

export const baseFileSchema = z.object({ path: z.string().min(1), sha256: sha256Schema, bytes: z.number().int().min(0) });

export const baseMetadataSchema = z.object({
  schemaVersion: z.literal(1),
  id: baseIdSchema,
  /** What the model is, for people. */
  description: z.string(),
  /** Layer whose output is the feature map (or vector) the head is trained on. */
  featureLayer: z.string().min(1),
  /** Input size the weights were trained at; other sizes from `IMAGE_SIZES` work for convolutional bases. */
  inputSize: imageSizeSchema,
  /** Preprocessing the weights expect: this belongs to the base, not to edgetune. */
  normalization: z.enum(Object.keys(NORMALIZATIONS) as [Normalization, ...Normalization[]]),
  /** For fine-tuning: the layer whose output is cached, everything above it is trainable. */
  fineTuneFrom: z.string().min(1).optional(),
  licence: z.string().min(1),
  source: z.string().min(1),
  /** sha256 over the model files, in `files` order (see `baseHash`). */
  sha256: sha256Schema,
  files: z.array(baseFileSchema).min(2),
});
export type BaseMetadata = z.output<typeof baseMetadataSchema>;
