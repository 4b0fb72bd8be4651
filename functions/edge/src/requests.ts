import type { OpenAPIHono } from "@hono/zod-openapi";
import { historyOf, readMetadata, readPointer } from "#shared/artifacts.ts";
import { tryParseContractJson } from "#shared/contracts/parse.ts";
import {
  MAX_OUTCOME_BYTES,
  MAX_REQUEST_BYTES,
  type OnnxExport,
  onnxExportSchema,
  operatorRequestSchema,
  outcomeMessage,
  POINTER_KINDS,
  type RequestOutcome,
  requestIdSchema,
  requestMessage,
  requestOfKey,
  requestOutcomeSchema,
} from "#shared/contracts/request.ts";
import { NotFoundError } from "#shared/errors.ts";
import { hex, hmacSha256Hex, signedWithAny } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import { CaptureObjectTooLargeError, type CaptureStore } from "./capture/store.ts";
import { operatorKeyValues } from "./http/auth.ts";
import { ApiError } from "./http/errors.ts";
import { encodeKey, type ModelSource, signedBucket } from "./model/source.ts";
import { exportFileRoute, exportInfoRoute, requestRoute, requestsRoute } from "./openapi.ts";

/**
 * The console's actions (issue #30): the worker may write only under `captures/`, so an operator's
 * rollback, promotion, "train now", "apply reviewed" or ONNX export is a request written there, signed
 * with the operator's key exactly as a review decision is; the dispatcher verifies it and applies it with
 * its own rights (jobs/train/src/requests/requests.ts), then writes its outcome, which is read back here.
 * The ONNX file an export leaves beside its version (under models/, which the worker reads but cannot
 * write) is streamed to operator keys. Every route here is behind consoleAuth (app.ts).
 */
type AppEnv = { Bindings: Env };

/** Requests shown per model: the newest outcomes and pending requests, within one request's subrequests. */
const SHOWN_OUTCOMES = 20;
const SHOWN_PENDING = 10;
/** Requests listed from this many days back (a pending one is dead after MAX_REQUEST_AGE_MS anyway). */
const LISTED_DAYS = 31;

export function registerRequestRoutes(
  app: OpenAPIHono<AppEnv>,
  deps: { catalogFor: (env: Env) => ModelSource; captureStoreFor: (env: Env) => CaptureStore },
): void {
  app.openapi(requestRoute, async (c) => {
    const { name } = c.req.valid("param");
    const body = c.req.valid("json");
    const source = deps.catalogFor(c.env);
    // Checked here so a typo answers at once, and again by the dispatcher, which trusts nothing under captures/.
    if (body.version) {
      await readMetadata(source, name, body.version).catch((e: unknown) => {
        if (e instanceof NotFoundError) throw new ApiError(404, "version_not_found", `Model ${name} has no version ${body.version}.`);
        throw e;
      });
    }
    const movesPointer = POINTER_KINDS.includes(body.kind);
    const pointer = body.version && !movesPointer ? null : await readPointer(source, name);
    if (!pointer && (movesPointer || !body.version)) throw new ApiError(404, "model_not_found", `No model named ${name} with a served version.`);
    // A rollback or promotion applies only while the model serves what it serves now (signed `from`, and
    // a rollback's target): one written back later by whoever holds the edge's key finds it moved.
    const to = body.kind === "rollback" && pointer ? historyOf(pointer)[0] : undefined;
    if (body.kind === "rollback" && !to)
      throw new ApiError(409, "no_earlier_version", `Model ${name} has no earlier served version to roll back to; serve a version by name instead.`);
    const issuedAt = new Date().toISOString();
    const unsigned = {
      id: newRequestId(issuedAt),
      model: name,
      kind: body.kind,
      ...(body.version ? { version: body.version } : {}),
      ...(pointer && movesPointer ? { from: pointer.version, fromPromotedAt: pointer.promotedAt } : {}),
      ...(to ? { to } : {}),
      issuedAt,
    };
    // Signed with the operator's own key (consoleAuth checked it); the dispatcher verifies it with the operators' keys.
    const operatorKey = (c.req.header("authorization") ?? "").replace(/^Bearer\s+/i, "");
    const request = operatorRequestSchema.parse({ ...unsigned, by: "console", signature: await hmacSha256Hex(operatorKey, requestMessage(unsigned)) });
    await deps.captureStoreFor(c.env).put(keys.captureRequest(name, request.id), JSON.stringify(request), "application/json");
    return c.json(stateOf(request, null, true), 202);
  });

  app.openapi(requestsRoute, async (c) => {
    const { name } = c.req.valid("param");
    const store = deps.captureStoreFor(c.env);
    // Ids sort by time: listed from a month ago, so keys sorting first ("0….json", written with the edge's
    // key) cannot fill the listing and hide the newest; only keys named as ids count.
    const since = newRequestId(new Date(Date.now() - LISTED_DAYS * 86_400_000).toISOString()).slice(0, 15);
    const listed = async (prefix: string) =>
      (await store.list(prefix, 1000, `${prefix}${since}`)).filter((k) => requestIdSchema.safeParse(k.slice(prefix.length, -".json".length)).success);
    const [outcomeKeys, requestKeys] = await Promise.all([listed(keys.captureOutcomes(name)), listed(keys.captureRequests(name))]);
    // Ids sort by time: the newest last. Under captures/, so each read is bounded and anything unreadable skipped.
    const operatorKeys = operatorKeyValues(c.env);
    const outcomes = await Promise.all(
      (await Promise.all(outcomeKeys.slice(-SHOWN_OUTCOMES).map((k) => readBounded(store, k, MAX_OUTCOME_BYTES)))).flatMap((bytes) => {
        const parsed = bytes ? tryParseContractJson(requestOutcomeSchema, bytes) : null;
        return parsed?.success ? [parsed.data] : [];
      }),
    );
    // Signed by the dispatcher with an operator key: one the edge's key wrote is flagged, and does not end its request's "pending".
    const verified = await Promise.all(outcomes.map((o) => signedWithAny(o.signature, outcomeMessage(name, o), operatorKeys)));
    const done = new Set(outcomes.filter((_, i) => verified[i]).map((o) => o.id));
    const pendingKeys = requestKeys.filter((k) => requestOfKey(k)?.model === name && !done.has(requestOfKey(k)?.id ?? "")).slice(-SHOWN_PENDING);
    const pending = (await Promise.all(pendingKeys.map((k) => readBounded(store, k, MAX_REQUEST_BYTES)))).flatMap((bytes) => {
      const parsed = bytes ? tryParseContractJson(operatorRequestSchema, bytes) : null;
      return parsed?.success && parsed.data.model === name ? [parsed.data] : [];
    });
    const pendingVerified = await Promise.all(pending.map((r) => signedWithAny(r.signature, requestMessage(r), operatorKeys)));
    const requests = [
      ...pending.map((r, i) => stateOf(r, null, pendingVerified[i] === true)),
      // An unverified outcome beside its still-pending request is not shown: the request is.
      ...outcomes.flatMap((o, i) => (verified[i] || !pending.some((r) => r.id === o.id) ? [stateOf(o, o, verified[i] === true)] : [])),
    ].sort((a, b) => (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
    return c.json({ model: name, requests, truncated: outcomeKeys.length > SHOWN_OUTCOMES || requestKeys.length > SHOWN_PENDING }, 200);
  });

  app.openapi(exportInfoRoute, async (c) => {
    const { name, version } = c.req.valid("param");
    return c.json({ model: name, version, onnx: await readExportInfo(deps.catalogFor(c.env), name, version) }, 200);
  });

  // Streamed, never held: a MobileNetV2 export is some 9–14 MB, an isolate has 128 MB and the model it serves in it.
  app.openapi(exportFileRoute, async (c) => {
    const { name, version } = c.req.valid("param");
    deps.captureStoreFor(c.env); // 501 without the S3 API, as every console listing
    // Only a finished export: its description is written last (a half-written or stray file is not one).
    const info = await readExportInfo(deps.catalogFor(c.env), name, version);
    if (!info) throw noExport(name, version);
    const { bucketUrl, send } = signedBucket(c.env);
    const res = await send(new Request(`${bucketUrl}/${encodeKey(keys.versionOnnx(name, version))}`));
    if (!res.ok || !res.body) {
      await res.body?.cancel();
      if (res.status === 404 || res.status === 403) throw noExport(name, version);
      throw new ApiError(503, "storage_unavailable", `Model storage answered HTTP ${res.status}; try again shortly.`, { "retry-after": "5" });
    }
    c.header("content-type", "application/octet-stream");
    c.header("content-disposition", `attachment; filename="${name}-${version}.onnx"`);
    c.header("cache-control", "private, no-store");
    c.header("x-content-type-options", "nosniff");
    const length = res.headers.get("content-length");
    if (length) c.header("content-length", length); // the browser shows the download's progress
    return c.body(res.body, 200);
  });
}

/** A version's onnx.json, if there is a valid one for it. */
async function readExportInfo(source: ModelSource, name: string, version: string): Promise<OnnxExport | null> {
  const r = await source.getIfChanged(keys.versionOnnxInfo(name, version));
  const parsed = r.status === 200 ? tryParseContractJson(onnxExportSchema, r.bytes as Uint8Array) : null;
  return parsed?.success && parsed.data.model === name && parsed.data.version === version ? parsed.data : null;
}

const noExport = (name: string, version: string) =>
  new ApiError(
    404,
    "export_not_found",
    `${name} ${version} has no ONNX export yet: ask for one with "Export ONNX" on the model's page (or run edgetune export ${name} ${version}).`,
  );

/** `20261206T051500-<8 random hex>`: sorts by time, unique per request (the signature covers it, so a replay cannot take another id). */
function newRequestId(issuedAt: string): string {
  return `${issuedAt.slice(0, 19).replace(/[-:]/g, "")}-${hex(crypto.getRandomValues(new Uint8Array(4)))}`;
}

function stateOf(r: Pick<RequestOutcome, "id" | "kind" | "version" | "issuedAt">, outcome: RequestOutcome | null, verified: boolean) {
  return {
    verified,
    id: r.id,
    kind: r.kind ?? null,
    version: r.version ?? null,
    issuedAt: r.issuedAt,
    state: outcome?.state ?? ("pending" as const),
    message: outcome?.message ?? null,
    at: outcome?.at ?? null,
    provisional: outcome?.provisional === true,
  };
}

async function readBounded(store: CaptureStore, key: string, maxBytes: number): Promise<Uint8Array | null> {
  const got = await store.get(key, undefined, maxBytes).catch((e: unknown) => {
    if (e instanceof CaptureObjectTooLargeError) return null; // not the dispatcher's or the worker's: skipped
    throw e;
  });
  return got?.bytes ?? null;
}
