import type { Context } from "hono";
import { bodyLimit } from "hono/body-limit";
import { EDGE_FORMATS } from "../image/decode.ts";
import { ApiError } from "./errors.ts";

/**
 * Reads the image from a classify request: a raw `image/jpeg|png|webp` body, or multipart form data
 * with an `image` field. Hono's bodyLimit enforces the size limit while the body streams in, so a
 * chunked body without Content-Length cannot exhaust memory.
 */
export const RAW_TYPES: string[] = Object.values(EDGE_FORMATS);

export async function readImageBody(c: Context, maxBytes: number): Promise<Uint8Array> {
  const type = (c.req.header("content-type") ?? "").split(";")[0]?.trim().toLowerCase() ?? "";
  const isMultipart = type === "multipart/form-data";
  if (!isMultipart && !RAW_TYPES.includes(type)) {
    throw new ApiError(
      415,
      "unsupported_media_type",
      `Content-Type must be one of ${RAW_TYPES.join(", ")} or multipart/form-data with an "image" field${type ? ` (got ${type})` : ""}.`,
    );
  }
  // Multipart adds a little framing around the image.
  const limit = isMultipart ? maxBytes + 64 * 1024 : maxBytes;
  // Called from the handler, not mounted as route middleware: route middleware would run before the
  // model name, top_k and content type are checked, and the body would no longer load while tf starts.
  await bodyLimit({
    maxSize: limit,
    onError: () => {
      throw tooLarge(maxBytes);
    },
  })(c, async () => {});
  if (!isMultipart) return c.req.bytes();
  let form: FormData;
  try {
    form = await c.req.formData();
  } catch {
    throw new ApiError(400, "invalid_multipart", "The multipart body cannot be parsed.");
  }
  const field = form.get("image");
  if (field === null) throw new ApiError(422, "missing_image_field", 'The multipart body has no "image" field.');
  if (typeof field === "string") throw new ApiError(422, "invalid_image_field", 'The "image" field must be a file, not text.');
  if (field.size > maxBytes) throw tooLarge(maxBytes);
  return new Uint8Array(await field.arrayBuffer());
}

function tooLarge(maxBytes: number): ApiError {
  return new ApiError(413, "payload_too_large", `The image is larger than ${(maxBytes / 1024 / 1024).toFixed(1)} MiB.`);
}
