import type { EdgeWorker } from "../../infra/local/edge-worker.ts";
import type { SampleImage } from "../../jobs/train/src/dataset/sample.ts";

/**
 * POSTs a sample image to the worker's classify endpoint as a client does: the worker's key, the
 * content type told by the file name. `headers` add to or replace those (another key, capture opt-out).
 */
export function postClassify(
  edge: Pick<EdgeWorker, "url" | "apiKey">,
  model: string,
  img: Pick<SampleImage, "file" | "bytes">,
  headers: Record<string, string> = {},
): Promise<Response> {
  return fetch(`${edge.url}/v1/models/${model}/classify`, {
    method: "POST",
    headers: { authorization: `Bearer ${edge.apiKey}`, "content-type": img.file.endsWith(".jpg") ? "image/jpeg" : "image/png", ...headers },
    body: img.bytes as BodyInit,
  });
}
