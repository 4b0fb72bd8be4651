import { concatBytes } from "../../../../shared/bytes.ts";
import { ApiError } from "./errors.ts";

/**
 * Reads the image from a classify request: a raw `image/jpeg|png|webp` body, or multipart form data
 * with an `image` field. The size limit is enforced while streaming, so a chunked body without
 * Content-Length cannot exhaust memory.
 */
export const RAW_TYPES = ["image/jpeg", "image/png", "image/webp"];

export async function readImageBody(req: Request, maxBytes: number): Promise<Uint8Array> {
  const type = (req.headers.get("content-type") ?? "").split(";")[0]?.trim().toLowerCase() ?? "";
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
  const declared = Number(req.headers.get("content-length") ?? Number.NaN);
  if (Number.isFinite(declared) && declared > limit) throw tooLarge(maxBytes);
  const bytes = await readLimited(req, limit, maxBytes);
  if (!isMultipart) return bytes;
  let form: FormData;
  try {
    form = await new Response(bytes, { headers: { "content-type": req.headers.get("content-type") ?? "" } }).formData();
  } catch {
    throw new ApiError(400, "invalid_multipart", "The multipart body cannot be parsed.");
  }
  const field = form.get("image");
  if (field === null) throw new ApiError(422, "missing_image_field", 'The multipart body has no "image" field.');
  if (typeof field === "string") throw new ApiError(422, "invalid_image_field", 'The "image" field must be a file, not text.');
  const image = new Uint8Array(await field.arrayBuffer());
  if (image.byteLength > maxBytes) throw tooLarge(maxBytes);
  return image;
}

async function readLimited(req: Request, limit: number, maxBytes: number): Promise<Uint8Array> {
  if (!req.body) return new Uint8Array();
  const reader = req.body.getReader();
  const chunks: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.byteLength;
    if (total > limit) {
      await reader.cancel();
      throw tooLarge(maxBytes);
    }
    chunks.push(value);
  }
  return concatBytes(chunks);
}

function tooLarge(maxBytes: number): ApiError {
  return new ApiError(413, "payload_too_large", `The image is larger than ${(maxBytes / 1024 / 1024).toFixed(1)} MiB.`);
}
