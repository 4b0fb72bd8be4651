/** The API, described for people and client generators; served at GET /openapi.json. */
const error = { $ref: "#/components/schemas/Error" };
const errorResponse = (description: string) => ({ description, content: { "application/json": { schema: error } } });
const name = { name: "name", in: "path", required: true, schema: { type: "string", pattern: "^[a-z0-9][a-z0-9._-]{0,62}$" } };

export const openapi = {
  openapi: "3.1.0",
  info: { title: "edgetune classify API", version: "1.0.0", description: "Image classification with models trained by edgetune, served at the edge." },
  components: {
    securitySchemes: { bearer: { type: "http", scheme: "bearer" } },
    schemas: {
      Error: {
        type: "object",
        required: ["error"],
        properties: { error: { type: "object", required: ["code", "message"], properties: { code: { type: "string" }, message: { type: "string" } } } },
      },
      Prediction: {
        type: "object",
        required: ["label", "score"],
        properties: { label: { type: "string" }, score: { type: "number", minimum: 0, maximum: 1 } },
      },
    },
  },
  security: [{ bearer: [] }],
  paths: {
    "/v1/models/{name}/classify": {
      post: {
        summary: "Classify one image",
        parameters: [name, { name: "top_k", in: "query", schema: { type: "integer", minimum: 1, maximum: 100, default: 5 } }],
        requestBody: {
          required: true,
          content: {
            "image/jpeg": { schema: { type: "string", format: "binary" } },
            "image/png": { schema: { type: "string", format: "binary" } },
            "image/webp": { schema: { type: "string", format: "binary" } },
            "multipart/form-data": { schema: { type: "object", required: ["image"], properties: { image: { type: "string", format: "binary" } } } },
          },
        },
        responses: {
          "200": {
            description: "Predictions, best first. Also a Server-Timing header (decode, preprocess, inference).",
            content: {
              "application/json": {
                schema: {
                  type: "object",
                  properties: {
                    model: { type: "string" },
                    version: { type: "string" },
                    predictions: { type: "array", items: { $ref: "#/components/schemas/Prediction" } },
                    timings: { type: "object", additionalProperties: { type: "number" } },
                  },
                },
              },
            },
          },
          "400": errorResponse("Corrupt or unreadable image"),
          "401": errorResponse("Missing or invalid API key"),
          "404": errorResponse("Unknown model"),
          "413": errorResponse("Image too large (bytes or pixels)"),
          "415": errorResponse("Unsupported content type or image format"),
          "422": errorResponse("Invalid parameters (top_k, multipart field)"),
          "503": errorResponse("Model not available yet (Retry-After)"),
        },
      },
    },
    "/v1/models/{name}": {
      get: {
        summary: "The served version of a model: labels, input size, metrics, training date",
        parameters: [name],
        responses: { "200": { description: "Model description" }, "401": errorResponse("Missing or invalid API key"), "404": errorResponse("Unknown model") },
      },
    },
    "/healthz": {
      get: { summary: "Liveness and model status (no key needed; reveals no secrets)", security: [], responses: { "200": { description: "OK" } } },
    },
    "/openapi.json": { get: { summary: "This document", security: [], responses: { "200": { description: "OpenAPI 3.1" } } } },
  },
} as const;
