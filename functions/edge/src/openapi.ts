import { createRoute, type OpenAPIHono, z } from "@hono/zod-openapi";
import { artifactMetadataSchema, metricsSchema } from "#shared/contracts/artifact.ts";
import { captureConfigSchema, captureIdSchema, captureRecordSchema } from "#shared/contracts/capture.ts";
import { nameSchema, sha256Schema } from "#shared/contracts/common.ts";
import { newLabelSchema } from "#shared/contracts/dataset.ts";
import { onnxExportSchema, REQUEST_KINDS, REQUEST_STATES, requestIdSchema } from "#shared/contracts/request.ts";
import { monitorSummarySchema } from "#shared/monitor.ts";
import { RAW_TYPES } from "./http/body.ts";

/**
 * The API's routes with the zod schemas their inputs are validated with (app.ts); the OpenAPI
 * document served at GET /openapi.json is generated from the same definitions, so it cannot drift.
 */
const errorSchema = z.object({ error: z.object({ code: z.string(), message: z.string() }) }).openapi("Error");
const errorResponse = (description: string) => ({ description, content: { "application/json": { schema: errorSchema } } });
/** A client key limited to some models (API_KEYS `key:modelA+modelB`) gets this same answer for every other name. */
const unknownModel = errorResponse("Unknown model, or one outside this key's scope (the same answer: a scoped key cannot tell them apart)");

export const modelParams = z.object({ name: nameSchema });

/**
 * 1–100, default 5 when absent or empty. Only plain digits count (`Number` would also take " 5", "1e2"
 * or "0x10"); when the parameter is repeated the first one counts, as `c.req.query` reads it.
 */
const topKSchema = z.preprocess((raw) => {
  const v: unknown = Array.isArray(raw) ? raw[0] : raw;
  if (v === undefined || v === "") return undefined;
  return typeof v === "string" && /^\d{1,3}$/.test(v) ? Number(v) : v;
}, z.number().int().min(1).max(100).default(5));

/** `?threshold=0.8`: one score threshold for every label instead of the version's own (0 to 1). */
const thresholdSchema = z.preprocess((raw) => {
  const v: unknown = Array.isArray(raw) ? raw[0] : raw;
  if (v === undefined || v === "") return undefined;
  return typeof v === "string" && /^(0|1)?(\.\d+)?$/.test(v) && v !== "." ? Number(v) : v;
}, z.number().min(0).max(1).optional());

const predictionSchema = z.object({ label: z.string(), score: z.number().min(0).max(1) }).openapi("Prediction");

const metadata = artifactMetadataSchema.shape;
/** What a model's operators see besides what a client needs (an operator key, CONSOLE_API_KEYS). */
const modelDetailSchema = z.object({
  preprocessing: metadata.preprocessing,
  strategy: metadata.strategy,
  base: metadata.base.shape.id,
  metrics: metricsSchema.pick({ accuracy: true, evaluatedOn: true, perClass: true }),
  calibration: metadata.calibration,
  thresholds: metadata.thresholds,
  noneLabel: metadata.noneLabel,
  novelty: metadata.novelty,
  trainedAt: metadata.createdAt,
  promotedAt: z.iso.datetime(),
  load: z
    .object({ loadedAt: z.iso.datetime(), fetchMs: z.number(), parseMs: z.number(), warmupMs: z.number() })
    .describe("How this isolate loaded the model (cold-start breakdown)"),
});
/** A client key gets what it needs to call classify (labels, input size, version); the rest is for operator keys. */
const modelSchema = z
  .object({ model: nameSchema, version: metadata.version, labels: metadata.labels, input: metadata.input })
  .extend(modelDetailSchema.partial().shape)
  .describe("preprocessing, strategy, base, metrics, trainedAt, promotedAt and load: operator keys only");

/**
 * The body is only described here and read by `readImageBody`: plain schema objects, because a zod
 * schema on multipart/form-data would make zod-openapi parse the whole body first, past the size limit.
 */
const binary = { schema: { type: "string" as const, format: "binary" } };

export const classifyRoute = createRoute({
  method: "post",
  path: "/v1/models/{name}/classify",
  summary: "Classify one image",
  request: {
    params: modelParams,
    query: z.object({ top_k: topKSchema, threshold: thresholdSchema }),
    body: {
      required: true,
      content: {
        ...Object.fromEntries(RAW_TYPES.map((t) => [t, binary])),
        "multipart/form-data": { schema: { type: "object", required: ["image"], properties: { image: binary.schema } } },
      },
    },
  },
  responses: {
    200: {
      description: "Predictions, best first. Also a Server-Timing header (decode, preprocess, inference).",
      content: {
        "application/json": {
          schema: z.object({
            model: nameSchema,
            version: z.string(),
            label: z.string().nullable().describe("The answer: the top label when its score clears its threshold; null when unsure or none of these"),
            unsure: z.boolean().describe("No label cleared its threshold (the version's per-label thresholds, or ?threshold=)"),
            none: z
              .boolean()
              .describe(
                "The image is none of the labels: the model's none-of-these class scored highest, or its features are less similar to every label's training images than the version's floor",
              ),
            threshold: z.number().nullable().describe("The threshold the top label was held to (null: none of these)"),
            noneBy: z
              .enum(["class", "novelty"])
              .optional()
              .describe("With none of these: the none-of-these class won (class), or the image's similarity is below the floor (novelty)"),
            similarity: z
              .number()
              .optional()
              .describe("Cosine similarity of the image's features to the nearest label's training images (versions with a novelty floor)"),
            similarityFloor: z.number().optional().describe("Below this similarity the answer is none of these (the version's, fitted at training)"),
            predictions: z.array(predictionSchema).describe("Calibrated scores, best first; the none-of-these class is not listed"),
            timings: z.object({ decodeMs: z.number(), preprocessMs: z.number(), inferenceMs: z.number(), totalMs: z.number() }),
          }),
        },
      },
    },
    400: errorResponse("Corrupt or unreadable image"),
    401: errorResponse("Missing or invalid API key"),
    404: unknownModel,
    408: errorResponse("The body did not arrive within MAX_BODY_SECONDS"),
    413: errorResponse("Image too large (bytes or pixels)"),
    415: errorResponse("Unsupported content type or image format"),
    422: errorResponse("Invalid parameters (top_k, threshold, multipart field)"),
    503: errorResponse(
      "Model not available yet (`model_unavailable`), the instance is busy (`busy`), or the model store refused the worker's credentials (`store_access_denied`); with Retry-After",
    ),
  },
});

export const modelRoute = createRoute({
  method: "get",
  path: "/v1/models/{name}",
  summary: "The served version of a model: labels and input size; with an operator key also metrics, base and training date",
  request: { params: modelParams },
  responses: {
    200: { description: "Model description", content: { "application/json": { schema: modelSchema } } },
    401: errorResponse("Missing or invalid API key"),
    404: unknownModel,
    503: errorResponse(
      "Model not available yet (`model_unavailable`), or the model store refused the worker's credentials (`store_access_denied`); with Retry-After",
    ),
  },
});

const versionSchema = z.string().regex(/^v[0-9a-f]{12}$/);

/** What every console listing may answer besides its own errors (operator keys only: http/auth.ts consoleAuth). */
const consoleErrors = {
  401: errorResponse("Missing or invalid API key"),
  403: errorResponse("Not an operator key (CONSOLE_API_KEYS), or the worker has none"),
  503: errorResponse("Model storage unavailable (`storage_unavailable`), or it refused the worker's credentials (`store_access_denied`)"),
};
export const versionParams = z.object({ name: nameSchema, version: versionSchema });

export const modelsRoute = createRoute({
  method: "get",
  path: "/v1/models",
  summary: "The models in the bucket by name, a page at a time, each with its served version and that version's held-out accuracy",
  request: {
    query: z.object({
      after: nameSchema.optional().describe("The last name of the previous page (its `next`): this page starts after it"),
    }),
  },
  responses: {
    200: {
      description: "Models in the bucket's order of their folders (by bytes of `<name>/`: `a-b` comes before `a`)",
      content: {
        "application/json": {
          schema: z.object({
            models: z.array(
              z.object({
                name: nameSchema,
                version: z.string().nullable(),
                promotedAt: z.string().nullable(),
                accuracy: z.number().nullable().describe("The served version's held-out accuracy (null: none served, or its metadata unreadable)"),
                evaluatedOn: z.number().int().nullable(),
              }),
            ),
            next: nameSchema.nullable().describe("Pass as `after` for the next page; null on the last page"),
            truncated: z.boolean().describe("True when there is a next page"),
          }),
        },
      },
    },
    ...consoleErrors,
    501: errorResponse("Listing needs the S3 API (not available with MODELS_BASE_URL)"),
  },
});

export const versionsRoute = createRoute({
  method: "get",
  path: "/v1/models/{name}/versions",
  summary: "A model's versions with their metrics, oldest first, and the promotion history",
  request: { params: modelParams },
  responses: {
    200: {
      description: "Versions",
      content: {
        "application/json": {
          schema: z.object({
            model: nameSchema,
            current: z.string().nullable(),
            history: z.array(z.string()),
            versions: z.array(
              z.object({
                version: versionSchema,
                createdAt: z.string(),
                accuracy: z.number(),
                evaluatedOn: z.number().int(),
                strategy: z.string(),
                base: z.string(),
                images: z.number().int(),
                current: z.boolean(),
              }),
            ),
            truncated: z.boolean(),
          }),
        },
      },
    },
    ...consoleErrors,
    404: errorResponse("Unknown model"),
    501: errorResponse("Listing needs the S3 API (not available with MODELS_BASE_URL)"),
  },
});

export const reportRoute = createRoute({
  method: "get",
  path: "/v1/models/{name}/versions/{version}/report",
  summary: "A version's training report (report.json, checked against the version's sha256 list)",
  request: { params: versionParams },
  responses: {
    200: {
      description: "The report: metrics, confusion matrix, mistakes, phases, promotion decision",
      content: { "application/json": { schema: z.looseObject({}) } },
    },
    ...consoleErrors,
    404: errorResponse("Unknown model or version"),
  },
});

const comparedVersionSchema = z.object({
  version: versionSchema,
  createdAt: z.string(),
  current: z.boolean().describe("The version the model serves"),
  labels: z.array(z.string()).describe("In the order of the confusion matrix's rows and columns"),
  accuracy: z.number(),
  evaluatedOn: z.number().int(),
  perClass: metricsSchema.shape.perClass,
  confusion: z.array(z.array(z.number().int())).describe("Rows: true label, columns: predicted; empty when it could not be read (see note)"),
  note: z.string().optional().describe("Why `confusion` is empty: an older version whose report is missing or too large to read here"),
  heldOutSha256: sha256Schema.nullable().describe("The held-out set's identity (null: not recorded, an older version)"),
  dataset: z.object({ name: nameSchema, fingerprint: sha256Schema, images: z.number().int() }),
  strategy: z.string(),
  base: z.string(),
});

export const compareRoute = createRoute({
  method: "get",
  path: "/v1/models/{name}/versions/{version}/compare/{other}",
  summary: "Two versions side by side: accuracy, per-label precision and recall, confusion, and whether they were measured on the same held-out images",
  request: { params: versionParams.extend({ other: versionSchema }) },
  responses: {
    200: {
      description: "Both versions' numbers, in the order asked",
      content: {
        "application/json": {
          schema: z.object({
            model: nameSchema,
            versions: z.tuple([comparedVersionSchema, comparedVersionSchema]),
            heldOut: z.object({
              same: z.boolean().nullable().describe("true: the same images; false: different ones (not like for like); null: not recorded"),
              message: z.string(),
            }),
          }),
        },
      },
    },
    ...consoleErrors,
    404: errorResponse("Unknown model or version"),
    422: errorResponse("A version's report is larger than the worker reads (`report_too_large`)"),
  },
});

export const captureParams = z.object({ name: nameSchema, id: captureIdSchema });

export const capturesRoute = createRoute({
  method: "get",
  path: "/v1/models/{name}/captures",
  summary: "Captured inputs waiting for review, newest first (operators)",
  request: { params: modelParams },
  responses: {
    200: {
      description: "The review queue and the model's capture settings",
      content: {
        "application/json": {
          schema: z.object({
            model: nameSchema,
            settings: captureConfigSchema,
            captures: z.array(captureRecordSchema.extend({ decision: z.enum(["accept", "discard"]).nullable(), label: z.string().nullable() })),
            truncated: z.boolean(),
          }),
        },
      },
    },
    ...consoleErrors,
    501: errorResponse("Capture needs the S3 API (not available with MODELS_BASE_URL)"),
  },
});

export const captureImageRoute = createRoute({
  method: "get",
  path: "/v1/models/{name}/captures/{id}/image",
  summary: "A captured input's stored image (operators)",
  request: { params: captureParams },
  responses: {
    200: { description: "The image as stored", content: { "image/png": binary, "image/jpeg": binary, "image/webp": binary, "image/gif": binary } },
    ...consoleErrors,
    404: errorResponse("No such capture"),
    422: errorResponse("Its record is larger than any the edge writes: not read (`stored_file_too_large`)"),
  },
});

export const decisionBodySchema = z
  .object({
    action: z.enum(["accept", "discard"]),
    label: newLabelSchema.optional(),
    /** sha256 (hex) of the image bytes the reviewer was shown, computed by the page: what the decision is bound to. */
    imageSha256: sha256Schema.optional(),
  })
  .refine((d) => d.action === "discard" || d.label !== undefined, { message: "an accepted capture needs its label", path: ["label"] })
  .refine((d) => d.action === "discard" || d.imageSha256 !== undefined, {
    message: "an accepted capture needs the sha256 of the image shown",
    path: ["imageSha256"],
  });

export const decisionRoute = createRoute({
  method: "post",
  path: "/v1/models/{name}/captures/{id}/decision",
  summary: "Accept a capture into the dataset under a label, or discard it (operators; applied by the next nightly run)",
  request: { params: captureParams, body: { required: true, content: { "application/json": { schema: decisionBodySchema } } } },
  responses: {
    200: {
      description: "The decision as recorded",
      content: { "application/json": { schema: z.object({ id: captureIdSchema, action: z.enum(["accept", "discard"]), label: z.string().nullable() }) } },
    },
    ...consoleErrors,
    404: errorResponse("No such capture"),
    409: errorResponse("The stored image is not the one the reviewer was shown"),
    422: errorResponse("Invalid decision"),
  },
});

export const monitorRoute = createRoute({
  method: "get",
  path: "/v1/models/{name}/monitor",
  summary: "The served model's traffic per day against its held-out split, with drift flags (operators; written by the nightly job)",
  request: { params: modelParams },
  responses: {
    200: { description: "The monitoring summary", content: { "application/json": { schema: monitorSummarySchema } } },
    ...consoleErrors,
    404: errorResponse("No summary yet"),
    422: errorResponse("The summary is larger than any the nightly job writes: not read (`stored_file_too_large`)"),
  },
});

/** What the console asks the dispatcher to do (shared/contracts/request.ts); `version` for promote and export-onnx only. */
export const requestBodySchema = z
  .object({
    kind: z.enum(REQUEST_KINDS),
    version: versionSchema.optional(),
  })
  .refine((r) => (r.kind === "promote" || r.kind === "export-onnx") === (r.version !== undefined), {
    message: "promote and export-onnx name a version; rollback, train and apply-reviewed do not",
    path: ["version"],
  });

const requestStateSchema = z
  .object({
    id: requestIdSchema,
    kind: z.enum(REQUEST_KINDS).nullable().describe("null when the request file was replaced by something unreadable (its outcome says so)"),
    version: versionSchema.nullable(),
    issuedAt: z.iso.datetime(),
    state: z.enum(["pending", ...REQUEST_STATES]),
    message: z.string().nullable().describe("What the dispatcher did, or why not, in one sentence; null while pending"),
    at: z.iso.datetime().nullable(),
    verified: z
      .boolean()
      .describe(
        "Signed with an operator key (by the worker for a request, the dispatcher for an outcome); false: written by someone else with the edge's S3 key",
      ),
    provisional: z.boolean().describe("A refusal another dispatcher job may still replace with its own outcome (the console keeps polling)"),
  })
  .openapi("OperatorRequest");

export const requestRoute = createRoute({
  method: "post",
  path: "/v1/models/{name}/requests",
  summary:
    "Ask the dispatcher to roll back, promote a version, train now, apply reviewed captures now or export a version as ONNX (operators; signed with the key, applied once)",
  request: { params: modelParams, body: { required: true, content: { "application/json": { schema: requestBodySchema } } } },
  responses: {
    202: {
      description: "Recorded; the dispatcher applies it and writes its outcome (GET …/requests)",
      content: { "application/json": { schema: requestStateSchema } },
    },
    ...consoleErrors,
    404: errorResponse("Unknown model or version"),
    409: errorResponse("A rollback with no earlier served version"),
    422: errorResponse("Invalid request"),
    501: errorResponse("Requests need the S3 API (not available with MODELS_BASE_URL)"),
  },
});

export const requestsRoute = createRoute({
  method: "get",
  path: "/v1/models/{name}/requests",
  summary: "The model's recent console requests, newest first: pending, or done / refused / failed with the reason (operators)",
  request: { params: modelParams },
  responses: {
    200: {
      description: "Requests",
      content: { "application/json": { schema: z.object({ model: nameSchema, requests: z.array(requestStateSchema), truncated: z.boolean() }) } },
    },
    ...consoleErrors,
    501: errorResponse("Requests need the S3 API (not available with MODELS_BASE_URL)"),
  },
});

export const exportInfoRoute = createRoute({
  method: "get",
  path: "/v1/models/{name}/versions/{version}/export",
  summary: "The version's stored ONNX export: size, sha256, opset, or null while there is none (operators; made by an export-onnx request)",
  request: { params: versionParams },
  responses: {
    200: {
      description: "The export, or null (a page asks for every version it lists: none yet is no error)",
      content: { "application/json": { schema: z.object({ model: nameSchema, version: versionSchema, onnx: onnxExportSchema.nullable() }) } },
    },
    ...consoleErrors,
  },
});

export const exportFileRoute = createRoute({
  method: "get",
  path: "/v1/models/{name}/versions/{version}/export/model.onnx",
  summary: "Download the version's ONNX file, streamed from the bucket (operators)",
  request: { params: versionParams },
  responses: {
    200: {
      description: "The ONNX file (uint8 RGB NHWC in, probabilities out; see the README's Export section)",
      content: { "application/octet-stream": binary },
    },
    ...consoleErrors,
    404: errorResponse("No export of this version (yet)"),
    501: errorResponse("Downloads need the S3 API (not available with MODELS_BASE_URL)"),
  },
});

/** Models one multi-model request may name: each answer costs its head (or a whole model) on the same image. */
export const MAX_MODELS_PER_REQUEST = 32;

export const multiClassifyRoute = createRoute({
  method: "post",
  path: "/v1/classify",
  summary: "Classify one image with several models: heads on the same base share one pass of it",
  request: {
    query: z.object({
      models: z.string().min(1).describe(`Model names, comma-separated (at most ${MAX_MODELS_PER_REQUEST}); each answers as its single classify would`),
      top_k: topKSchema,
    }),
    body: classifyRoute.request.body,
  },
  responses: {
    200: {
      description:
        "One answer per model, in the order asked: its predictions, or its error (`model_not_found`, `model_unavailable`, `store_access_denied`) where that model cannot answer; a model outside a scoped key's models answers `model_not_found`, as a missing one. Also a Server-Timing header.",
      content: {
        "application/json": {
          schema: z.object({
            results: z.array(
              z.union([
                classifyRoute.responses[200].content["application/json"].schema.omit({ timings: true }),
                z.object({ model: nameSchema, error: z.object({ code: z.string(), message: z.string() }) }),
              ]),
            ),
            timings: z.object({ decodeMs: z.number(), preprocessMs: z.number(), inferenceMs: z.number(), totalMs: z.number() }),
          }),
        },
      },
    },
    400: errorResponse("Corrupt or unreadable image"),
    401: errorResponse("Missing or invalid API key"),
    408: errorResponse("The body did not arrive within MAX_BODY_SECONDS"),
    413: errorResponse("Image too large (bytes or pixels)"),
    415: errorResponse("Unsupported content type or image format"),
    422: errorResponse("Invalid parameters (`invalid_models`: a name that cannot exist, none, or too many; top_k)"),
    503: errorResponse("The instance is busy (`busy`); with Retry-After"),
  },
});

/** /healthz for an operator key: what each model is and why it is not ok, the isolate's memory and queue, capture counts. */
const healthDetailSchema = z.object({
  models: z.array(
    z.object({
      name: nameSchema,
      version: z.string().nullable(),
      problem: z.string().nullable(),
      code: z.enum(["store_access_denied"]).nullable().describe("The problem's error code where it has one of its own"),
      base: z.string().nullable().describe("The shared base this head runs on (`<base sha256>-<size>`); null for a whole model or one not loaded"),
      bytes: z.number().int().nullable().describe("Tensor bytes of the model's own weights (a head's, without its base)"),
    }),
  ),
  bases: z
    .array(
      z.object({
        sha256: z.string(),
        size: z.number().int(),
        featureLayer: z.string().optional(),
        heads: z.number().int().describe("Head instances holding this one copy of the base"),
        bytes: z.number().int().optional(),
        loadedAt: z.string().optional(),
        problem: z.string().optional(),
        failures: z.number().int().optional().describe("A base that cannot be loaded: failures in a row (one back-off for all its heads)"),
        retryAt: z.string().optional().describe("A base that cannot be loaded: when the next head that needs it tries it again"),
      }),
    )
    .describe("Shared bases in this isolate: one copy per (base, size), and those that failed to load"),
  memory: z
    .object({
      tensors: z.number().int(),
      bytes: z.number().int(),
      wasm: z.object({ total: z.number().int(), byModule: z.record(z.string(), z.number().int()) }),
    })
    .nullable(),
  requests: z.object({ active: z.number().int(), queued: z.number().int() }),
  modelCache: z
    .object({ kind: z.enum(["r2", "cache-api"]), found: z.number().int(), stored: z.number().int() })
    .nullable()
    .describe(
      "Where verified model bytes are shared between isolates (R2 with the MODEL_CACHE binding, else the Cache API): files found there, and files fetched from the bucket and stored; null before the first model load",
    ),
  capture: z
    .object({
      captured: z.number().int(),
      overCap: z.number().int(),
      busy: z.number().int(),
      failed: z.number().int(),
      optedOut: z.number().int(),
      flushed: z.number().int(),
    })
    .nullable()
    .describe("What traffic capture did in this isolate; null before the first classification"),
});

export const healthRoute = createRoute({
  method: "get",
  path: "/healthz",
  summary: "Liveness (no key needed: status only); with an operator key also each model's version and problem, memory, queue and capture counts",
  security: [],
  responses: {
    200: {
      description: "OK",
      content: {
        "application/json": {
          schema: z
            .object({ status: z.enum(["ok", "degraded"]) })
            .extend(healthDetailSchema.partial().shape)
            .describe("Without a key: status only. With an operator key (CONSOLE_API_KEYS): models, memory, requests, modelCache and capture too"),
        },
      },
    },
  },
});

/** Adds the security scheme and serves the document; call after the routes are registered. */
export function serveOpenApi<E extends { Bindings: Env }>(app: OpenAPIHono<E>): void {
  app.openAPIRegistry.registerComponent("securitySchemes", "bearer", {
    type: "http",
    scheme: "bearer",
    description: "A client key (API_KEYS; one may be limited to some models) or an operator key (CONSOLE_API_KEYS: every route)",
  });
  app.openAPIRegistry.registerPath({
    method: "get",
    path: "/openapi.json",
    summary: "This document",
    security: [],
    responses: { 200: { description: "OpenAPI 3.1" } },
  });
  app.doc31("/openapi.json", {
    openapi: "3.1.0",
    info: { title: "edgetune classify API", version: "1.0.0", description: "Image classification with models trained by edgetune, served at the edge." },
    security: [{ bearer: [] }],
  });
}
