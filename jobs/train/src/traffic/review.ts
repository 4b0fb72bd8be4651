import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { readMetadata, readPointer } from "#shared/artifacts.ts";
import type { ArtifactMetadata } from "#shared/contracts/artifact.ts";
import {
  type CaptureDecision,
  type CaptureRecord,
  captureDecisionSchema,
  captureIdSchema,
  decisionMessage,
  parseCaptureRecord,
} from "#shared/contracts/capture.ts";
import { classifyDatasetKeys, labelProblem, newLabelSchema } from "#shared/contracts/dataset.ts";
import { parseContract, tryParseContractJson } from "#shared/contracts/parse.ts";
import { DatasetError, InvalidOptionError, NotFoundError, userMessage } from "#shared/errors.ts";
import { sha256Hex, signedWithAny } from "#shared/hash.ts";
import { isBarePng } from "#shared/image/png.ts";
import { keys } from "#shared/keys.ts";
import { type ObjectStore, ObjectTooLargeError } from "#shared/s3/store.ts";
import { decodeImage } from "../dataset/decode.ts";
import type { Logger } from "../log.ts";
import { safeText } from "../output.ts";

/**
 * Review decisions, from the moment a person makes them to the dataset. A decision is bound to
 * (model, id, action, label, image sha256) when it is made and never re-read from `captures/`, which the
 * edge may write: the CLI applies the decision it holds in memory, with the bytes it hashed; a console
 * decision is applied only if an operator's key signed exactly those fields. Each accept is applied at
 * most once: a marker outside `captures/` is written (conditionally) before its image is added.
 */

export interface PendingCapture extends CaptureRecord {
  decision: CaptureDecision | null;
}

/**
 * Bounds on what is read from the edge-writable prefix before it is held: a record or decision the edge
 * writes is well under these (a record ≈ 1 KB, a decision ≈ 0.5 KB); a forged giant is refused unread,
 * and one review reads at most `MAX_PENDING` records (the newest days first; the rest wait for the next).
 */
const MAX_RECORD_BYTES = 16 * 1024;
const MAX_DECISION_BYTES = 4 * 1024;
const MAX_PENDING = 10_000;
/** A stored capture is at most 2048 px a side (capture.json `maxSide`); well above any such image. */
const MAX_IMAGE_BYTES = 32 * 1024 * 1024;

/**
 * The days a review reads: the bucket expires captures after `captureRetentionDays` (cdk.json, 30 by
 * default; EDGETUNE_CAPTURE_RETENTION_DAYS when it was changed), so only those day folders are listed —
 * built from dates, never from a listing the edge's key can fill (junk folders, records dated 2000-01-01).
 */
export function captureDays(now: Date = new Date(), env: NodeJS.ProcessEnv = process.env): string[] {
  const retention = Math.min(3650, Math.max(1, Number(env.EDGETUNE_CAPTURE_RETENTION_DAYS) || 30));
  // From tomorrow (an edge clock a little ahead) back to the oldest day the bucket still keeps.
  return Array.from({ length: retention + 2 }, (_, i) => new Date(now.getTime() + (1 - i) * 86_400_000).toISOString().slice(0, 10));
}

/** A capture's image, unless it is gone or larger than any capture (null: the caller says which). */
async function captureImage(store: ObjectStore, capture: CaptureRecord): Promise<Uint8Array | null> {
  try {
    return await store.get(capture.image.key, { maxBytes: MAX_IMAGE_BYTES });
  } catch (e) {
    if (e instanceof ObjectTooLargeError) throw new DatasetError(`its image is larger than any capture (${MAX_IMAGE_BYTES} bytes); it is not read`);
    throw e;
  }
}

/** A file under captures/ read within `maxBytes`; null when it is missing or larger (then it is not the edge's). */
export async function getCapped(store: ObjectStore, key: string, maxBytes: number): Promise<Uint8Array | null> {
  return store.get(key, { maxBytes }).catch((e: unknown) => {
    if (e instanceof ObjectTooLargeError) return null;
    throw e;
  });
}

/**
 * Every capture of `model` not applied yet (at most `MAX_PENDING`, the newest days first), oldest first,
 * with its decision if one was recorded.
 */
export async function listCaptures(store: ObjectStore, model: string, options: { now?: Date } = {}): Promise<PendingCapture[]> {
  const decisions = new Map<string, CaptureDecision>();
  for await (const o of store.list(keys.captureDecisions(model))) {
    if (o.size > MAX_DECISION_BYTES || decisions.size >= MAX_PENDING) continue;
    const decision = await readDecision(store, model, o.key);
    if (decision) decisions.set(decision.id, decision);
  }
  const out: PendingCapture[] = [];
  for (const day of captureDays(options.now)) {
    for await (const o of store.list(`${keys.captureImages(model)}${day}/`)) {
      if (!o.key.endsWith(".json") || o.size > MAX_RECORD_BYTES) continue;
      if (out.length >= MAX_PENDING) break;
      const record = await readRecord(store, model, o.key);
      if (record) out.push({ ...record, decision: decisions.get(record.id) ?? null });
    }
  }
  return out.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
}

/** A decision file, read within its bound; null unless it parses and is filed under its own id (that key is what is deleted once it is applied). */
async function readDecision(store: ObjectStore, model: string, key: string): Promise<CaptureDecision | null> {
  const bytes = await getCapped(store, key, MAX_DECISION_BYTES);
  const parsed = bytes === null ? null : tryParseContractJson(captureDecisionSchema, bytes);
  return parsed?.success && key === keys.captureDecision(model, parsed.data.id) ? parsed.data : null;
}

/** A capture record, read within its bound; null unless it is one of `model`'s and sits where its id says (the review deletes that key after applying it). */
async function readRecord(store: ObjectStore, model: string, key: string): Promise<CaptureRecord | null> {
  const bytes = await getCapped(store, key, MAX_RECORD_BYTES);
  const record = bytes ? parseCaptureRecord(model, bytes) : null;
  return record && key === keys.captureRecord(model, record.id) ? record : null;
}

export interface ApplyResult {
  accepted: { id: string; key: string }[];
  discarded: string[];
  refused: { id: string; reason: string }[];
  /** Decisions not signed by a current operator key: not applied, sent back to the review queue. */
  unverified: string[];
  /** Accepts applied before (a replayed decision): nothing added again. */
  replayed: string[];
}

/** The operators' console keys, which console decisions must be signed with (EDGETUNE_CONSOLE_KEYS; in AWS from Secrets Manager). */
export function operatorKeysFromEnv(env: NodeJS.ProcessEnv = process.env): string[] {
  return (env.EDGETUNE_CONSOLE_KEYS ?? "")
    .split(",")
    .map((k) => k.trim())
    .filter(Boolean);
}

/** True when the decision's signature was made with one of `operatorKeys` (see contracts/capture.ts; the worker signs with the same `hmacSha256Hex`). */
export async function signedByOperator(model: string, decision: CaptureDecision, operatorKeys: readonly string[]): Promise<boolean> {
  return signedWithAny(decision.signature, decisionMessage(model, decision), operatorKeys);
}

/** Where accepted captures of `model` go: the served version's dataset, its layout and labels. */
interface Target {
  dataset: string;
  split: boolean;
  labels: Set<string>;
}

async function targetOf(store: ObjectStore, model: string): Promise<Target> {
  const dataset = (await servedMetadata(store, model)).dataset.name;
  const rel: string[] = [];
  for await (const o of store.list(keys.dataset(dataset))) rel.push(o.key.slice(keys.dataset(dataset).length));
  if (rel.length === 0) throw new NotFoundError(`Dataset ${dataset} is gone: accepted captures have nowhere to go.`);
  const { layout, entries } = classifyDatasetKeys(rel);
  return { dataset, split: layout === "split", labels: new Set(entries.flatMap((e) => (e.kind === "image" ? [e.label] : []))) };
}

export async function servedMetadata(store: ObjectStore, model: string): Promise<ArtifactMetadata> {
  const pointer = await readPointer(store, model);
  if (!pointer) throw new NotFoundError(`Model ${model} has no served version.`);
  return readMetadata(store, model, pointer.version);
}

const labelList = (t: Target) => [...t.labels].sort().join(", ");

/**
 * `edgetune review --accept/--discard`: each decision is made here, in memory, on the bytes the operator
 * is acting on (their sha256 is part of it), recorded with a conditional put (an earlier decision is not
 * overwritten), and applied from memory. Nothing is read back from `captures/`, so a decision file
 * rewritten meanwhile changes nothing. `--accept` without `--as` takes the capture's predicted label only
 * if it is a label of the dataset.
 */
export async function reviewNow(
  store: ObjectStore,
  model: string,
  choices: { accept?: readonly string[]; discard?: readonly string[]; as?: string; unseen?: boolean },
  log: Logger,
): Promise<ApplyResult> {
  const result: ApplyResult = { accepted: [], discarded: [], refused: [], unverified: [], replayed: [] };
  const target = await targetOf(store, model);
  if (choices.as !== undefined) {
    const problem = newLabelSchema.safeParse(choices.as).success ? null : (labelProblem(choices.as) ?? "is not a plain folder name");
    if (problem) throw new InvalidOptionError("--as", choices.as, [`a label of dataset ${target.dataset} (${labelList(target)}); this one ${problem}`]);
    if (!target.labels.has(choices.as)) throw new InvalidOptionError("--as", choices.as, [...target.labels].sort());
  }
  // `<id>@<sha256>` (as `review --save` names the file) pins the bytes the operator looked at: the whole
  // hash (a prefix could be matched by other bytes made for it). An accept without one adds what is
  // stored now, which nobody looked at: only when the operator says so (--unseen).
  const pinned = new Map<string, string>();
  const idOf = (ref: string) => {
    const [id, sha] = ref.split("@") as [string, string | undefined];
    if (sha !== undefined) {
      if (!/^[0-9a-f]{64}$/i.test(sha))
        throw new InvalidOptionError("--accept", ref, ["<id>@<the full sha256 of 64 hex digits, as review --save names the file>"]);
      pinned.set(id, sha.toLowerCase());
    }
    return id;
  };
  for (const ref of choices.accept ?? []) {
    if (!ref.includes("@") && !choices.unseen)
      throw new InvalidOptionError("--accept", ref, [
        `<id>@<sha256> of an image you looked at (edgetune review ${model} --save <dir> names them so)`,
        "the id with --unseen, to add the bytes stored now without looking at them",
      ]);
  }
  const wanted = [
    ...(choices.accept ?? []).map((ref) => [idOf(ref), "accept"] as const),
    ...(choices.discard ?? []).map((ref) => [idOf(ref), "discard"] as const),
  ];
  // Every capture read (record and bytes) before anything is written: an unknown id stops the command.
  const read: { capture: CaptureRecord; action: "accept" | "discard"; bytes: Uint8Array | null; problem: string }[] = [];
  for (const [id, action] of wanted) {
    const capture = captureIdSchema.safeParse(id).success ? await readRecord(store, model, keys.captureRecord(model, id)) : null;
    if (!capture || capture.id !== id) throw new NotFoundError(`Model ${model} has no capture ${id} waiting for review (see edgetune review ${model}).`);
    let problem = "";
    const bytes =
      action === "accept"
        ? await captureImage(store, capture).catch((e: unknown) => {
            problem = userMessage(e);
            return null;
          })
        : null;
    read.push({ capture, action, bytes, problem });
  }
  for (const { capture, action, bytes, problem } of read) {
    const id = capture.id;
    let label: string | undefined;
    if (action === "accept") {
      label = choices.as ?? capture.predictions[0]?.label;
      // The stored label came from the edge-writable record: taken only if the dataset has it.
      if (label === undefined || !target.labels.has(label)) {
        result.refused.push({
          id,
          // The label is the edge-writable record's: escaped whole (a newline in it would start a line of its own).
          reason: `its predicted label "${safeText(label ?? "")}" is not a label of dataset ${target.dataset}; accept it with --as <label> (${labelList(target)})`,
        });
        continue;
      }
      if (!bytes) {
        result.refused.push({ id, reason: problem || `its image ${capture.image.key} is gone (expired?)` });
        continue;
      }
      const pin = pinned.get(id);
      if (pin !== undefined && (await sha256Hex(bytes)) !== pin) {
        result.refused.push({ id, reason: `its image is not the one saved as ${id}@${pin} (it changed, or the hash is wrong); review it again` });
        continue;
      }
    }
    const decision = parseContract(
      captureDecisionSchema,
      { id, action, label, decidedAt: new Date().toISOString(), by: "cli", ...(bytes ? { imageSha256: await sha256Hex(bytes) } : {}) },
      "decision",
    );
    if (!(await store.putIfAbsent(keys.captureDecision(model, id), JSON.stringify(decision), "application/json"))) {
      log.warn(`capture ${id} already had a recorded decision: it is not overwritten, and the one made here is applied`);
    }
    await applyOne(store, model, target, { capture, decision, bytes }, result, log);
  }
  return result;
}

/**
 * `edgetune review --save <dir>`: the images waiting for review, to look at, as `<id>@<sha256>.<ext>` (the
 * whole hash); `--accept <id>@<sha256>` then adds exactly those bytes or nothing.
 */
export async function saveCaptureImages(store: ObjectStore, model: string, dir: string): Promise<{ id: string; file: string }[]> {
  await mkdir(dir, { recursive: true });
  const out: { id: string; file: string }[] = [];
  for (const c of await listCaptures(store, model)) {
    const bytes = await captureImage(store, c).catch(() => null);
    if (!bytes) continue;
    const sub = c.image.contentType.split("/")[1] as string;
    const file = join(dir, `${c.id}@${await sha256Hex(bytes)}.${sub === "jpeg" ? "jpg" : sub}`);
    await writeFile(file, bytes);
    out.push({ id: c.id, file });
  }
  return out;
}

/**
 * The nightly step (and `review` when EDGETUNE_CONSOLE_KEYS is set): applies the console's stored
 * decisions of `model` that an operator's key signed, over the image sha256 the reviewer was shown.
 * Anything else under decisions/ could have been written with the edge's S3 credentials, which may
 * write there: it is not applied, and its capture goes back to the queue saying why.
 */
export async function applyDecisions(store: ObjectStore, model: string, log: Logger, options: { operatorKeys?: readonly string[] } = {}): Promise<ApplyResult> {
  const result: ApplyResult = { accepted: [], discarded: [], refused: [], unverified: [], replayed: [] };
  const operatorKeys = options.operatorKeys ?? operatorKeysFromEnv();
  const decided: Decided[] = [];
  // Driven by the decisions, each with its own capture read by key: forged records elsewhere in the queue
  // cannot crowd a signed decision out. A decision file that is not one (too large, unreadable, misfiled,
  // or about no capture) is deleted: left, it would be read again every night.
  const notDecisions: string[] = [];
  try {
    for await (const o of store.list(keys.captureDecisions(model))) {
      if (decided.length >= MAX_PENDING) break;
      const decision = o.size > MAX_DECISION_BYTES ? null : await readDecision(store, model, o.key);
      const record = decision ? await readRecord(store, model, keys.captureRecord(model, decision.id)) : null;
      if (!decision || !record) {
        notDecisions.push(o.key);
        continue;
      }
      // An accept must name the bytes shown (a discard only removes the capture).
      if ((decision.imageSha256 || decision.action === "discard") && (await signedByOperator(model, decision, operatorKeys))) {
        decided.push({ capture: record, decision, bytes: null });
        continue;
      }
      // Written with S3 access alone, or signed with a key that is no longer an operator's: not applied.
      result.unverified.push(record.id);
      log.warn(`the decision on capture ${record.id} of ${model} is not signed by an operator key (CONSOLE_API_KEYS): not applied, back in the queue`);
      await sendBack(store, model, record, "the decision was not signed by a current operator key; decide again").catch((e) =>
        log.warn(`capture ${record.id}: ${userMessage(e)}`),
      );
    }
  } finally {
    // Also when tonight's reading stops at its limit: what was found so far is not read again.
    if (notDecisions.length > 0) {
      log.warn(`${model}: ${notDecisions.length} file(s) under decisions/ are not decisions on a waiting capture (not the console's): deleted`);
      await store.delete(notDecisions).catch((e) => log.warn(`${model}: ${userMessage(e)}`));
    }
  }
  if (decided.length === 0) return result;
  const target = await targetOf(store, model);
  for (const d of decided) await applyOne(store, model, target, d, result, log);
  return result;
}

interface Decided {
  capture: CaptureRecord;
  decision: CaptureDecision;
  /** The bytes the decision was made on (the CLI's); null: read them now and check them against its sha256. */
  bytes: Uint8Array | null;
}

/** Back to the review queue, saying why, its decision removed. */
async function sendBack(store: ObjectStore, model: string, capture: CaptureRecord, reason: string): Promise<void> {
  await store.put(keys.captureRecord(model, capture.id), JSON.stringify({ ...capture, refused: { reason, at: new Date().toISOString() } }), "application/json");
  await store.delete([keys.captureDecision(model, capture.id)]);
}

/**
 * One decision, as it was made. An accept is checked as an upload is (a label the dataset has, an image
 * the job decodes, and exactly the bytes whose sha256 the decision names). If its applied-marker exists,
 * the decision was applied before: nothing is added. Else the image is copied into the dataset as
 * `<label>/captured-<id>.<ext>` (under `train/` with splits) with its provenance in the object's metadata,
 * and only then the marker is written. The capture, its image and its decision file are then deleted. A
 * refused accept goes back to the queue with the reason. The manifest is not rewritten: the next nightly
 * run sees the new images (its version fingerprint covers the listing) and trains on them.
 */
async function applyOne(store: ObjectStore, model: string, target: Target, d: Decided, result: ApplyResult, log: Logger): Promise<void> {
  const { capture, decision } = d;
  const captureKeys = [capture.image.key, keys.captureRecord(model, capture.id), keys.captureDecision(model, capture.id)];
  const cleanUp = () =>
    store.delete(captureKeys).catch((e) => log.warn(`capture ${capture.id}: applied, but not cleaned up (${userMessage(e)}); the lifecycle rule will`));
  if (decision.action === "discard") {
    await cleanUp();
    result.discarded.push(capture.id);
    return;
  }
  const label = decision.label as string;
  let key: string;
  try {
    if (!target.labels.has(label)) {
      throw new DatasetError(`label ${label} is not one of dataset ${target.dataset}'s labels (${labelList(target)}); push new labels with edgetune push`);
    }
    const bytes = d.bytes ?? (await captureImage(store, capture));
    if (!bytes) throw new NotFoundError(`its image ${capture.image.key} is gone (expired?)`);
    if (!decision.imageSha256 || (await sha256Hex(bytes)) !== decision.imageSha256) {
      throw new DatasetError("its image changed after it was reviewed; review it again");
    }
    // Only the edge's own output (a PNG it encoded from pixels): a file written straight to captures/ may
    // carry text, EXIF or bytes after the image that the reviewer never saw.
    if (capture.image.contentType !== "image/png" || !isBarePng(bytes)) {
      throw new DatasetError(
        "its image is not a plain PNG as the edge stores captures (other chunks, or bytes after the image): it was not written by the edge",
      );
    }
    await decodeImage(bytes);
    const sub = capture.image.contentType.split("/")[1] as string;
    key = `${keys.dataset(target.dataset)}${target.split ? "train/" : ""}${label}/captured-${capture.id}.${sub === "jpeg" ? "jpg" : sub}`;
    // At most once: a decision replayed after the operator deleted what it added finds the marker and
    // adds nothing. The marker is written only once the image is in (a put that fails, or a command
    // stopped in between, leaves no marker, so the next apply adds it; putting the same key again is harmless).
    const marker = keys.capturedApplied(target.dataset, model, capture.id);
    if (await store.head(marker)) {
      log.warn(`capture ${capture.id} of ${model} was applied to dataset ${target.dataset} before: not added again`);
      result.replayed.push(capture.id);
      await cleanUp();
      return;
    }
    await store.put(key, bytes, capture.image.contentType, {
      "edgetune-captured-from": `${model}@${capture.version}`,
      "edgetune-captured-at": capture.capturedAt,
      "edgetune-predicted": `${capture.predictions[0]?.label}:${capture.predictions[0]?.score.toFixed(4)}`,
      "edgetune-reviewed": `${decision.by} ${decision.decidedAt}`,
      "edgetune-sha256": decision.imageSha256,
    });
    await store.putIfAbsent(marker, JSON.stringify(decision), "application/json");
  } catch (e) {
    result.refused.push({ id: capture.id, reason: userMessage(e) });
    log.warn(`capture ${capture.id} of ${model} was not added: ${userMessage(e)}`);
    await sendBack(store, model, capture, userMessage(e)).catch((err) => log.warn(`capture ${capture.id}: ${userMessage(err)}`));
    return;
  }
  // In the dataset now: a failed clean-up does not undo that.
  await cleanUp();
  result.accepted.push({ id: capture.id, key });
  log.info(`capture ${capture.id} of ${model} added to dataset ${target.dataset} as ${label}`);
}
