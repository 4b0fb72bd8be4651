import { OpenAPIHono } from "@hono/zod-openapi";
import type { Context } from "hono";
import { cors } from "hono/cors";
import { HTTPException } from "hono/http-exception";
import { answer, type Prediction, versionUnsure } from "#shared/answer.ts";
import { readMetadata, readPointer } from "#shared/artifacts.ts";
import { listModelsPage, listVersions } from "#shared/catalog.ts";
import {
  CAPTURE_OFF,
  type CaptureConfig,
  type CaptureRecord,
  captureConfigSchema,
  captureDecisionSchema,
  captureIdSchema,
  decisionMessage,
  parseCaptureRecord,
} from "#shared/contracts/capture.ts";
import { nameSchema } from "#shared/contracts/common.ts";
import { tryParseContractJson } from "#shared/contracts/parse.ts";
import { NotFoundError } from "#shared/errors.ts";
import { hmacSha256Hex, sha256Hex } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import { monitorSummarySchema } from "#shared/monitor.ts";
import { preprocess } from "#shared/preprocess.ts";
import { Capturer, isOptOut } from "./capture/capture.ts";
import { CaptureObjectTooLargeError, type CaptureStore, CaptureStoreError, createCaptureStore } from "./capture/store.ts";
import { compareVersions, readReport } from "./catalog/compare.ts";
import { withDeadline } from "./deadline.ts";
import { type Admission, createAdmission } from "./http/admission.ts";
import { apiKeyAuth, consoleAuth, inScope, isOperator, modelScope } from "./http/auth.ts";
import { readImageBody } from "./http/body.ts";
import { ApiError, errorBody } from "./http/errors.ts";
import { decodeImage, encodePng } from "./image/decode.ts";
import { wasmMemoryBytes } from "./memory.ts";
import { type ModelCache, modelCache } from "./model/cache.ts";
import { predictAll } from "./model/predict.ts";
import { type LoadedModel, ModelRegistry, ModelUnavailableError, modelNotFound, STORE_REFUSED } from "./model/registry.ts";
import { createModelSource, ListingUnavailableError, type ModelSource, SourceError, StoreAccessDeniedError } from "./model/source.ts";
import {
  captureImageRoute,
  capturesRoute,
  classifyRoute,
  compareRoute,
  decisionRoute,
  healthRoute,
  MAX_MODELS_PER_REQUEST,
  modelParams,
  modelRoute,
  modelsRoute,
  monitorRoute,
  multiClassifyRoute,
  reportRoute,
  serveOpenApi,
  versionsRoute,
} from "./openapi.ts";
import { registerRequestRoutes } from "./requests.ts";
import { initTf, tf } from "./tf.ts";

/**
 * The classify API. One registry per isolate, created on the first request from the bindings.
 * Configuration (vars and secrets) is documented in wrangler.jsonc.
 */
type AppEnv = { Bindings: Env };

let registry: ModelRegistry | undefined;
let catalog: ModelSource | undefined;
/** The bucket as the console sees it: listings and small JSON files, no model loading. */
function catalogFor(env: Env): ModelSource {
  catalog ??= createModelSource(env);
  return catalog;
}
/** Subrequests one catalog call may spend on pointers or metadata (Workers allows 50 on Free, 1000 on Paid). */
const CATALOG_READS = 40;
let admission: Admission | undefined;
function admissionFor(env: Env): Admission {
  admission ??= createAdmission({ concurrent: Number(env.MAX_CONCURRENT_IMAGES || 1), queued: Number(env.MAX_QUEUED_IMAGES || 16) });
  return admission;
}
let cache: ModelCache | undefined;
function registryFor(env: Env): ModelRegistry {
  // Optional: a wrangler config without the R2 binding (older deploys, tests) uses the Cache API.
  cache ??= modelCache(env as { MODEL_CACHE?: R2Bucket });
  registry ??= new ModelRegistry(createModelSource(env), {
    ttlMs: Number(env.POINTER_TTL_SECONDS || 30) * 1000,
    memoryBudgetBytes: Number(env.MODEL_MEMORY_MB || 64) * 1024 * 1024,
    cache,
  });
  return registry;
}

let capturer: Capturer | undefined;
function capturerFor(env: Env): Capturer {
  capturer ??= new Capturer(createModelSource(env), createCaptureStore(env), {
    ttlMs: Number(env.POINTER_TTL_SECONDS || 30) * 1000,
    flushMs: Number(env.COUNTERS_FLUSH_SECONDS || 60) * 1000,
    encodePng,
    exclusive: (work) => admissionFor(env).exclusive(work),
    idle: () => admissionFor(env).idle(),
    log: (fields) => console.warn(JSON.stringify(fields)),
  });
  return capturer;
}

export const app = new OpenAPIHono<AppEnv>({
  // Invalid inputs answer in the API's error shape, not with zod's issue list.
  defaultHook: (result, c) => {
    if (result.success) return;
    // zod-openapi checks the query before the path; a name that cannot exist still answers 404 first.
    const name = c.req.param("name");
    const nameOk = name === undefined || modelParams.safeParse({ name }).success;
    if (!nameOk) throw new ApiError(404, "model_not_found", "No model with that name.");
    if (result.target === "param" && c.req.param("id") !== undefined) throw new ApiError(404, "capture_not_found", "No capture with that id.");
    if (result.target === "json" && c.req.path.endsWith("/requests")) {
      const issue = result.error.issues[0];
      throw new ApiError(
        422,
        "invalid_request",
        `A request is {"kind": "rollback" | "train" | "apply-reviewed"} or {"kind": "promote" | "export-onnx", "version": "v0123456789ab"} (${issue?.path.join(".") || "body"}: ${issue?.message}).`,
      );
    }
    if (result.target === "json") {
      const issue = result.error.issues[0];
      throw new ApiError(
        422,
        "invalid_decision",
        `A decision is {"action": "accept", "label": "<label>"} or {"action": "discard"} (${issue?.path.join(".") || "body"}: ${issue?.message}).`,
      );
    }
    if (result.target === "param") throw new ApiError(404, "version_not_found", "No version with that name (versions look like v0123456789ab).");
    if (result.error.issues[0]?.path[0] === "after") throw new ApiError(422, "invalid_after", "after is a model name: the `next` of the previous page.");
    if (result.error.issues[0]?.path[0] === "threshold") throw new ApiError(422, "invalid_threshold", "threshold must be a number from 0 to 1.");
    throw new ApiError(422, "invalid_top_k", "top_k must be a whole number from 1 to 100.");
  },
});

app.use("*", async (c, next) => {
  const origins = (c.env.CORS_ORIGINS ?? "")
    .split(",")
    .map((o) => o.trim())
    .filter(Boolean);
  if (origins.length === 0) return next();
  return cors({
    origin: origins.includes("*") ? "*" : origins,
    allowHeaders: ["Authorization", "Content-Type", "X-Edgetune-Capture"],
    allowMethods: ["GET", "POST", "OPTIONS"],
    exposeHeaders: ["Server-Timing"],
    maxAge: 600,
  })(c, next);
});

/**
 * Liveness for anyone; the details (served models and versions, their problems, memory, queue, capture
 * counts) for an operator key only: they tell an outsider which models exist and when the isolate is busy.
 */
app.openapi(healthRoute, async (c) => {
  const models = registry?.status() ?? [];
  const status = models.some((m) => m.lastError) ? ("degraded" as const) : ("ok" as const);
  if (!(await isOperator(c.req.header("authorization"), c.env))) return c.json({ status }, 200);
  return c.json(
    {
      status,
      models: models.map((m) => ({
        name: m.name,
        version: m.version ?? null,
        problem: m.lastError ?? null,
        code: m.errorCode ?? null,
        // The shared base a head runs on (null: a whole model), and its own tensor bytes.
        base: m.base ?? null,
        bytes: m.bytes ?? null,
      })),
      // One copy of each (base, size), whatever number of heads hold it (model/bases.ts).
      bases: registry?.basesStatus() ?? [],
      // Live tensors and their bytes in this isolate: constant between requests unless something leaks.
      memory: registry ? { tensors: tf.memory().numTensors, bytes: tf.memory().numBytes, wasm: wasmMemoryBytes() } : null,
      requests: admission?.stats() ?? { active: 0, queued: 0 },
      // Where this isolate's model bytes came from besides the bucket (model/cache.ts).
      modelCache: cache?.stats() ?? null,
      // What capture did in this isolate (failures never reach a classification; they are counted here).
      capture: capturer?.stats() ?? null,
    },
    200,
  );
});

app.use("/v1/*", apiKeyAuth());
for (const path of [
  "/v1/models",
  "/v1/models/:name/versions",
  "/v1/models/:name/versions/*",
  "/v1/models/:name/captures",
  "/v1/models/:name/captures/*",
  "/v1/models/:name/monitor",
  "/v1/models/:name/requests",
])
  app.use(path, consoleAuth());

app.openapi(modelRoute, async (c) => {
  const { name } = c.req.valid("param");
  await requireInScope(c, name);
  const operator = await isOperator(c.req.header("authorization"), c.env);
  const { model, release } = await acquire(c.env, name, (p) => c.executionCtx.waitUntil(p));
  try {
    const m = model.metadata;
    // A client gets what it needs to call classify; metrics (per label), base and timings are for operators.
    if (!operator) return c.json({ model: name, version: m.version, labels: m.labels, input: m.input }, 200);
    return c.json(
      {
        model: name,
        version: m.version,
        labels: m.labels,
        input: m.input,
        preprocessing: m.preprocessing,
        strategy: m.strategy,
        base: m.base.id,
        metrics: { accuracy: m.metrics.accuracy, evaluatedOn: m.metrics.evaluatedOn, perClass: m.metrics.perClass },
        // Absent for versions trained before them (older artifacts load unchanged).
        ...(m.calibration ? { calibration: m.calibration } : {}),
        ...(m.thresholds ? { thresholds: m.thresholds } : {}),
        ...(m.noneLabel ? { noneLabel: m.noneLabel } : {}),
        ...(m.novelty ? { novelty: m.novelty } : {}),
        trainedAt: m.createdAt,
        promotedAt: model.pointer.promotedAt,
        // How this isolate loaded it (cold-start breakdown).
        load: { loadedAt: new Date(model.loadedAt).toISOString(), ...model.timings },
      },
      200,
    );
  } finally {
    release();
  }
});

/** Models per page of GET /v1/models: two reads each (pointer, served version's metadata) within CATALOG_READS. */
const MODELS_PAGE = CATALOG_READS / 2;
app.openapi(modelsRoute, async (c) => {
  const { after } = c.req.valid("query");
  const source = catalogFor(c.env);
  // One page of names from the listing (not every model of the bucket): within the subrequest budget however many there are.
  const { names, more } = await listModelsPage(source, MODELS_PAGE, after);
  const models = await Promise.all(names.map((name) => servedSummary(source, name)));
  return c.json({ models, next: more ? (names.at(-1) ?? null) : null, truncated: more }, 200);
});

/** A model's served version and its held-out accuracy; what cannot be read is null (the list still shows the model). */
async function servedSummary(source: ModelSource, name: string) {
  const pointer = await readPointer(source, name).catch(() => null);
  const metadata = pointer ? await readMetadata(source, name, pointer.version, pointer.metadataSha256).catch(() => null) : null;
  return {
    name,
    version: pointer?.version ?? null,
    promotedAt: pointer?.promotedAt ?? null,
    accuracy: metadata?.metrics.accuracy ?? null,
    evaluatedOn: metadata?.metrics.evaluatedOn ?? null,
  };
}

app.openapi(versionsRoute, async (c) => {
  const { name } = c.req.valid("param");
  const { pointer, versions, truncated } = await listVersions(catalogFor(c.env), name, CATALOG_READS);
  if (!pointer && versions.length === 0) throw new ApiError(404, "model_not_found", `No model named ${name}.`);
  return c.json({ model: name, current: pointer?.version ?? null, history: pointer?.history ?? [], versions, truncated }, 200);
});

app.openapi(reportRoute, async (c) => {
  const { name, version } = c.req.valid("param");
  const source = catalogFor(c.env);
  try {
    return c.json(await readReport(source, await readMetadata(source, name, version)), 200);
  } catch (e) {
    if (e instanceof NotFoundError) throw new ApiError(404, "version_not_found", `Model ${name} has no version ${version} with a report.`);
    throw e;
  }
});

app.openapi(compareRoute, async (c) => {
  const { name, version, other } = c.req.valid("param");
  return c.json(await compareVersions(catalogFor(c.env), name, version, other), 200);
});

/**
 * The review queue, newest first: the day folders of the retention window, then each day's records from
 * the newest, skipping those already decided (their decision waits for the nightly run), within the
 * subrequests one request may spend. A capture whose decision the job could not apply is back, with why.
 * Whoever holds the edge's key may write under captures/, so what is read is bounded before it is held:
 * only keys named as a record of their own id are read (so a record is listed once), each read stops at
 * MAX_RECORD_BYTES, at most MAX_RECORD_READS are read, and a response holds at most REVIEW_PAGE records
 * and MAX_PAGE_BYTES of them.
 */
const REVIEW_PAGE = 30;
/** A record the edge writes is under 2 KB (5 predictions); anything far larger is not the edge's. */
const MAX_RECORD_BYTES = 16 * 1024;
const MAX_PAGE_BYTES = 256 * 1024;
/** Record reads one listing may spend (Workers allow 50 subrequests per request on the Free plan). */
const MAX_RECORD_READS = 40;
/** Subrequests for day listings and record reads together (the decisions' listing and the settings take the rest). */
const MAX_LISTING_SUBREQUESTS = 46;
const readsAllowed = (lists: number) => Math.min(MAX_RECORD_READS, MAX_LISTING_SUBREQUESTS - lists);
/** Captures expire after `captureRetentionDays` (cdk.json, 30 by default): the days a review can find one in. */
const REVIEW_DAYS = 30;
const reviewDays = (now: Date) => Array.from({ length: REVIEW_DAYS + 2 }, (_, i) => new Date(now.getTime() + (1 - i) * 86_400_000).toISOString().slice(0, 10));
app.openapi(capturesRoute, async (c) => {
  const { name } = c.req.valid("param");
  const store = captureStoreFor(c.env);
  const [decided, settings] = await Promise.all([store.list(keys.captureDecisions(name), 1000), readCaptureConfig(catalogFor(c.env), name)]);
  const decidedIds = new Set(decided.map((k) => k.slice(keys.captureDecisions(name).length, -".json".length)));
  // Candidates newest first; records are read a page at a time until the page is full, so a skipped
  // (forged) record does not take a real one's place — within MAX_RECORD_READS reads per response.
  const candidates: string[] = [];
  let truncated = false;
  // Day folders built from dates, newest first (tomorrow: an edge clock a little ahead), never from a
  // listing: junk keys sorted before the days ("images/0/x") or folders dated in the future or long ago
  // cannot take the queue's place. Each day listed is a subrequest, so record reads shrink to fit.
  let lists = 0;
  for (const day of reviewDays(new Date())) {
    if (candidates.length >= readsAllowed(lists)) {
      truncated = true;
      break;
    }
    lists++;
    const listed = await store.list(`${keys.captureImages(name)}${day}/`, 2000);
    if (listed.length >= 2000) truncated = true;
    candidates.push(...listed.filter((k) => isOwnRecordKey(name, k) && !decidedIds.has(idOfRecordKey(k))).reverse());
  }
  const maxReads = readsAllowed(lists);
  if (candidates.length > maxReads) truncated = true;
  const captures: CaptureRecord[] = [];
  let bytes = 0;
  let next = 0;
  while (captures.length < REVIEW_PAGE && next < Math.min(candidates.length, maxReads)) {
    const batch = candidates.slice(next, Math.min(next + REVIEW_PAGE - captures.length, maxReads));
    next += batch.length;
    const read = await Promise.all(
      batch.map(async (k) => {
        const got = await store.get(k, undefined, MAX_RECORD_BYTES).catch((e) => {
          if (e instanceof CaptureObjectTooLargeError) return null; // not the edge's: skipped
          throw e;
        });
        const record = got ? parseCaptureRecord(name, got.bytes) : null;
        // A record counts only under its own key: a copy filed under other names is not listed again.
        return record && record.id === idOfRecordKey(k) ? { record, size: got?.bytes.length ?? 0 } : null;
      }),
    );
    for (const r of read) {
      if (!r) continue;
      if (bytes + r.size > MAX_PAGE_BYTES) {
        truncated = true;
        next = Number.POSITIVE_INFINITY;
        break;
      }
      bytes += r.size;
      captures.push(r.record);
    }
  }
  if (next < candidates.length) truncated = true;
  return c.json({ model: name, settings, captures: captures.map((r) => ({ ...r, decision: null, label: null })), truncated }, 200);
});

app.openapi(captureImageRoute, async (c) => {
  const { name, id } = c.req.valid("param");
  const store = captureStoreFor(c.env);
  const record = await readCaptureRecord(store, name, id);
  const image = await store.get(record.image.key);
  if (!image) throw new ApiError(404, "capture_not_found", `Capture ${id} has no stored image.`);
  c.header("content-type", record.image.contentType);
  c.header("cache-control", "private, max-age=3600");
  c.header("x-content-type-options", "nosniff");
  return c.body(image.bytes as Uint8Array<ArrayBuffer>, 200);
});

app.openapi(decisionRoute, async (c) => {
  const { name, id } = c.req.valid("param");
  const body = c.req.valid("json");
  const store = captureStoreFor(c.env);
  const record = await readCaptureRecord(store, name, id);
  // The decision is bound to the bytes the reviewer was shown (the page hashes what it displayed), not to
  // what is stored now: an image swapped in between is refused here, and one swapped later by the job.
  const image = await store.get(record.image.key);
  if (!image) throw new ApiError(404, "capture_not_found", `Capture ${id} has no stored image.`);
  if (body.imageSha256 !== undefined && (await sha256Hex(image.bytes)) !== body.imageSha256)
    throw new ApiError(409, "image_changed", `The image of capture ${id} is not the one you were shown; reload the review page and decide again.`);
  const unsigned = {
    id,
    action: body.action,
    label: body.action === "accept" ? body.label : undefined,
    decidedAt: new Date().toISOString(),
    imageSha256: body.imageSha256,
  };
  // Signed with the operator's own key (consoleAuth checked it): the job verifies it with the operators' keys.
  const operatorKey = (c.req.header("authorization") ?? "").replace(/^Bearer\s+/i, "");
  const signature = await hmacSha256Hex(operatorKey, decisionMessage(name, unsigned));
  const decision = captureDecisionSchema.parse({ ...unsigned, by: "console", signature });
  await store.put(keys.captureDecision(name, id), JSON.stringify(decision), "application/json");
  return c.json({ id, action: decision.action, label: decision.label ?? null }, 200);
});

// Rollback, promote, train now, apply reviewed, export: signed requests the dispatcher applies (requests.ts).
registerRequestRoutes(app, { catalogFor, captureStoreFor });

/** A summary of 30 days of a model with 1000 labels is under 1 MB. */
const MAX_SUMMARY_BYTES = 2 * 1024 * 1024;
app.openapi(monitorRoute, async (c) => {
  const { name } = c.req.valid("param");
  const store = captureStoreFor(c.env);
  // Written by the nightly job, but under captures/, which the edge's key may write: read within a bound.
  const got = await store.get(keys.captureMonitor(name), undefined, MAX_SUMMARY_BYTES);
  const parsed = got ? tryParseContractJson(monitorSummarySchema, got.bytes) : null;
  if (!parsed?.success)
    throw new ApiError(404, "no_summary", `No monitoring summary for ${name} yet: the nightly job writes one once the edge has counted traffic.`);
  return c.json(parsed.data, 200);
});

app.openapi(classifyRoute, async (c) => {
  const t0 = performance.now();
  const { name } = c.req.valid("param");
  const { top_k: topK, threshold } = c.req.valid("query");
  await requireInScope(c, name);
  const maxPixels = Number(c.env.MAX_IMAGE_PIXELS || 2_100_000);
  const places = admissionFor(c.env);
  return places.admit(async () => {
    const bytes = await readBody(c);
    const { model, release } = await acquire(c.env, name, (p) => c.executionCtx.waitUntil(p));
    try {
      const { t1, t2, t3, prediction, pixels } = await places.exclusive(async () => {
        const t1 = performance.now();
        const { pixels } = await decodeImage(bytes, maxPixels);
        const t2 = performance.now();
        const size = model.metadata.input.size;
        const input = preprocess(pixels, size, model.metadata.preprocessing);
        const t3 = performance.now();
        const x = tf.tensor4d(input, [1, size, size, 3]);
        const [prediction] = predictAll([model], x) as [Prediction];
        x.dispose();
        return { t1, t2, t3, prediction, pixels };
      });
      const t4 = performance.now();
      const labels = model.metadata.labels;
      // Calibrated scores (the training job folded the temperature into the model); the version's
      // per-label thresholds or the caller's one number decide unsure, its rejection class none of these.
      const { predictions, ...decision } = answer(prediction, model.metadata, { topK, ...(threshold === undefined ? {} : { threshold }) });
      const timings = { decodeMs: round(t2 - t1), preprocessMs: round(t3 - t2), inferenceMs: round(t4 - t3), totalMs: round(t4 - t0) };
      // The traffic loop (capture/capture.ts): after the answer, never in its way.
      const after = capturerFor(c.env).observe({
        model: name,
        version: model.metadata.version,
        labels,
        scores: prediction.scores,
        unsure: versionUnsure(prediction, model.metadata),
        pixels,
        optOut: isOptOut(c.req.raw.headers),
      });
      if (after) c.executionCtx.waitUntil(after);
      c.header("server-timing", serverTiming(timings));
      return c.json({ model: name, version: model.metadata.version, ...decision, predictions, timings }, 200);
    } finally {
      release();
    }
  });
});

/**
 * One image, several models: decoded once, preprocessed once per (size, preprocessing), the base of
 * heads that share one run once (model/predict.ts). Each model answers as its single classify would,
 * or with its own error; the request fails only for what concerns them all (key, body, image, busy).
 */
app.openapi(multiClassifyRoute, async (c) => {
  const t0 = performance.now();
  const { models: list, top_k: topK } = c.req.valid("query");
  const names = [...new Set(list.split(",").map((n) => n.trim()))];
  if (names.length > MAX_MODELS_PER_REQUEST || names.some((n) => !nameSchema.safeParse(n).success))
    throw new ApiError(
      422,
      "invalid_models",
      `models is a comma-separated list of 1 to ${MAX_MODELS_PER_REQUEST} model names (a-z, 0-9, '.', '_', '-', starting with a letter or digit).`,
    );
  const scope = await modelScope(c.req.header("authorization"), c.env);
  const maxPixels = Number(c.env.MAX_IMAGE_PIXELS || 2_100_000);
  const places = admissionFor(c.env);
  return places.admit(async () => {
    const bytes = await readBody(c);
    const waitUntil = (p: Promise<unknown>) => c.executionCtx.waitUntil(p);
    const leases = await Promise.all(
      names.map((name) =>
        // Outside the key's scope: the missing model's answer, without asking the registry.
        (inScope(scope, name) ? acquire(c.env, name, waitUntil) : Promise.reject(modelNotFound(name))).then(
          (lease) => ({ name, lease }),
          (e: unknown) => {
            if (!(e instanceof ModelUnavailableError)) throw e;
            return { name, error: { code: e.code, message: e.message } };
          },
        ),
      ),
    );
    const served = leases.flatMap((l) => ("lease" in l && l.lease ? [l.lease.model] : []));
    try {
      const { t1, t2, t3, scores, pixels } = await places.exclusive(async () => {
        const t1 = performance.now();
        const { pixels } = await decodeImage(bytes, maxPixels);
        const t2 = performance.now();
        // Models of one base take the same input; others (another size or preprocessing) get theirs.
        const groups = new Map<string, LoadedModel[]>();
        for (const m of served) {
          const key = `${m.metadata.input.size} ${JSON.stringify(m.metadata.preprocessing)}`;
          groups.set(key, [...(groups.get(key) ?? []), m]);
        }
        const inputs = [...groups.values()].map((group) => {
          const { input, preprocessing } = (group[0] as LoadedModel).metadata;
          return { group, x: tf.tensor4d(preprocess(pixels, input.size, preprocessing), [1, input.size, input.size, 3]) };
        });
        const t3 = performance.now();
        const scores = new Map<LoadedModel, Prediction>();
        for (const { group, x } of inputs) {
          predictAll(group, x).forEach((s, i) => {
            scores.set(group[i] as LoadedModel, s);
          });
          x.dispose();
        }
        return { t1, t2, t3, scores, pixels };
      });
      const t4 = performance.now();
      const results = leases.map((l) => {
        if (!("lease" in l) || !l.lease) return { model: l.name, error: (l as { error: { code: string; message: string } }).error };
        const m = l.lease.model;
        const s = scores.get(m) as Prediction;
        const after = capturerFor(c.env).observe({
          model: l.name,
          version: m.metadata.version,
          labels: m.metadata.labels,
          scores: s.scores,
          unsure: versionUnsure(s, m.metadata),
          pixels,
          optOut: isOptOut(c.req.raw.headers),
        });
        if (after) c.executionCtx.waitUntil(after);
        // The same answer as its single classify: calibrated scores, the version's thresholds, none of these.
        const { predictions, ...decision } = answer(s, m.metadata, { topK });
        return { model: l.name, version: m.metadata.version, ...decision, predictions };
      });
      const timings = { decodeMs: round(t2 - t1), preprocessMs: round(t3 - t2), inferenceMs: round(t4 - t3), totalMs: round(t4 - t0) };
      c.header("server-timing", serverTiming(timings));
      return c.json({ results, timings }, 200);
    } finally {
      for (const l of leases) if ("lease" in l) l.lease?.release();
    }
  });
});

/** The image body within MAX_IMAGE_BYTES and MAX_BODY_SECONDS (a body that trickles in holds the isolate's place), with tfjs ready. */
async function readBody(c: Context<AppEnv>): Promise<Uint8Array> {
  const maxBytes = Number(c.env.MAX_IMAGE_BYTES || 4 * 1024 * 1024);
  const bodySeconds = Number(c.env.MAX_BODY_SECONDS || 10);
  const [bytes] = await Promise.all([
    withDeadline(
      readImageBody(c, maxBytes),
      bodySeconds * 1000,
      () => new ApiError(408, "body_timeout", `The image did not arrive within ${bodySeconds} s; send it again (resized images arrive faster).`),
    ),
    initTf(),
  ]);
  return bytes;
}

const serverTiming = (t: { decodeMs: number; preprocessMs: number; inferenceMs: number; totalMs: number }) =>
  `decode;dur=${t.decodeMs}, preprocess;dur=${t.preprocessMs}, inference;dur=${t.inferenceMs}, total;dur=${t.totalMs}`;

serveOpenApi(app);

app.notFound((c) => c.json(errorBody("not_found", `No route for ${c.req.method} ${new URL(c.req.url).pathname}.`), 404));

app.onError((err, c) => {
  // Thrown by bearerAuth with the finished 401 response (see http/auth.ts).
  // Hono's validator on a body that is not JSON (a plain-text 400 otherwise).
  if (err instanceof HTTPException && err.status === 400 && !err.res && /JSON/i.test(err.message))
    return c.json(errorBody("invalid_json", "The body is not valid JSON: send one JSON object."), 400);
  if (err instanceof HTTPException) return err.getResponse();
  if (err instanceof ApiError) {
    for (const [k, v] of Object.entries(err.headers)) c.header(k, v);
    return c.json(errorBody(err.code, err.message), err.status);
  }
  if (err instanceof ListingUnavailableError) return c.json(errorBody("listing_unavailable", `The console cannot list models: ${err.message}.`), 501);
  if (err instanceof CaptureObjectTooLargeError)
    return c.json(
      errorBody("stored_file_too_large", "A file under captures/ is larger than any the edge writes, so it is not read; delete it or let it expire."),
      422,
    );
  if (err instanceof CaptureStoreError) {
    c.header("retry-after", "5");
    return c.json(errorBody("storage_unavailable", "Capture storage is not answering; try again shortly."), 503);
  }
  if (err instanceof StoreAccessDeniedError) {
    c.header("retry-after", "60");
    // Plain words for any client; S3's code, the key and the secrets' names are in /healthz for operators.
    return c.json(errorBody(err.code, STORE_REFUSED), 503);
  }
  if (err instanceof SourceError) {
    c.header("retry-after", "5");
    return c.json(errorBody("storage_unavailable", `Model storage is not answering (${err.message}); try again shortly.`), 503);
  }
  if (err instanceof ModelUnavailableError) {
    if (err.code === "model_not_found") return c.json(errorBody(err.code, err.message), 404);
    c.header("retry-after", String(err.retryAfterSeconds));
    return c.json(errorBody(err.code, err.message), 503);
  }
  console.error(
    JSON.stringify({ level: "error", message: "unhandled error", path: new URL(c.req.url).pathname, error: err instanceof Error ? err.message : String(err) }),
  );
  return c.json(errorBody("internal_error", "Something went wrong on our side; the request can be retried."), 500);
});

function captureStoreFor(env: Env): CaptureStore {
  const store = createCaptureStore(env);
  if (!store) throw new ListingUnavailableError("traffic capture needs the S3 API (S3_BUCKET and credentials); MODELS_BASE_URL serves files only");
  return store;
}

async function readCaptureConfig(source: ModelSource, name: string): Promise<CaptureConfig> {
  const r = await source.getIfChanged(keys.captureConfig(name));
  if (r.status !== 200) return CAPTURE_OFF;
  const parsed = tryParseContractJson(captureConfigSchema, r.bytes as Uint8Array);
  return parsed.success ? parsed.data : CAPTURE_OFF;
}

/** `captures/<model>/images/<day>/<id>.json` → id */
const idOfRecordKey = (key: string) => key.slice(key.lastIndexOf("/") + 1, -".json".length);
/** True for the key a record of its own id has (a valid id, in the day folder that id names). */
const isOwnRecordKey = (model: string, key: string) => {
  const id = idOfRecordKey(key);
  return key.endsWith(".json") && captureIdSchema.safeParse(id).success && key === keys.captureRecord(model, id);
};

async function readCaptureRecord(store: CaptureStore, name: string, id: string): Promise<CaptureRecord> {
  const got = await store.get(keys.captureRecord(name, id), undefined, MAX_RECORD_BYTES);
  const record = got ? parseCaptureRecord(name, got.bytes) : null;
  if (!record || record.id !== id)
    throw new ApiError(404, "capture_not_found", `Model ${name} has no capture ${id} (it may have been reviewed already, or expired).`);
  return record;
}

/**
 * A model outside the key's scope answers exactly as one that does not exist, decided before the
 * registry or storage is touched: neither the answer nor its time tells a scoped key which models exist.
 */
async function requireInScope(c: Context<AppEnv>, name: string): Promise<void> {
  if (!inScope(await modelScope(c.req.header("authorization"), c.env), name)) throw modelNotFound(name);
}

async function acquire(env: Env, name: string, waitUntil: (p: Promise<unknown>) => void) {
  await initTf();
  return registryFor(env).acquire(name, waitUntil);
}

const round = (ms: number) => Math.round(ms * 10) / 10;
