import { readFile } from "node:fs/promises";
import type { Browser, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPointer } from "#shared/artifacts.ts";
import type { ModelPointer } from "#shared/contracts/artifact.ts";
import { type OperatorRequest, requestMessage } from "#shared/contracts/request.ts";
import { hmacSha256Hex, sha256Hex } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import { Dispatcher } from "../infra/local/dispatcher.ts";
import { type EdgeWorker, startEdgeWorker } from "../infra/local/edge-worker.ts";
import { type LocalS3, startLocalS3 } from "../infra/local/s3-server.ts";
import { memoryLogger } from "../jobs/train/src/log.ts";
import { train } from "../jobs/train/src/train.ts";
import { haveBrowser, launchChromium, layoutProblems, openPage } from "./support/browser.ts";
import { uploadSample } from "./support/datasets.ts";

/**
 * The console's actions in a real headless Chromium (as test/console.test.ts), end to end: the buttons post
 * requests to the worker in workerd, the local dispatcher picks them up from the local S3 server and
 * applies them in a child process as the Batch container would, and the page shows each outcome — the
 * served version moving, a training run queued, a refusal with its reason, and the download of an export.
 */
const OPERATOR = "operator-key-console-actions-1";
let s3: LocalS3;
let edge: EdgeWorker;
let browser: Browser;
let dispatcher: Dispatcher;
let v1: string;
let v2: string;

describe.skipIf(!haveBrowser)("console actions (headless Chromium, the local dispatcher)", () => {
  beforeAll(async () => {
    s3 = await startLocalS3();
    await uploadSample(s3.store, "emoji", { perLabel: 8, size: 96 });
    const small = { dataset: "emoji", imageSize: 96 as const, views: 1, head: { epochs: 5 }, promote: "always" as const };
    v1 = (await train(s3.store, small, memoryLogger())).version;
    v2 = (await train(s3.store, { ...small, seed: 7 }, memoryLogger())).version;
    edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 1, vars: { CONSOLE_API_KEYS: OPERATOR } });
    // The dispatcher's children verify requests with the operators' keys, as the stack gives them in AWS.
    process.env.EDGETUNE_CONSOLE_KEYS = OPERATOR;
    // --promote never: the runs it starts (the manifest it finds at start, "train now") leave the served version alone.
    const trainArgs = ["--image-size", "96", "--views", "1", "--epochs", "5", "--promote", "never"];
    dispatcher = new Dispatcher({ store: s3.store, s3: s3.config, pollMs: 200, trainArgs, output: "collect" });
    dispatcher.start();
    while (dispatcher.jobs.length === 0) await new Promise((r) => setTimeout(r, 100));
    await dispatcher.idle();
    browser = await launchChromium();
  });
  afterAll(async () => {
    delete process.env.EDGETUNE_CONSOLE_KEYS;
    await browser?.close();
    await dispatcher?.stop();
    await edge?.stop();
    await s3?.stop();
  });

  async function modelPage(): Promise<{ page: Page; problems: string[] }> {
    const { page, problems } = await openPage(browser, `${edge.url}/`, { key: OPERATOR });
    await page.goto(`${edge.url}/#/models/emoji`);
    await page.waitForSelector("#actions #requests :is(table, p)");
    return { page, problems };
  }
  /** The file name of one image of `label` in the dataset. */
  async function firstImage(label: string): Promise<string> {
    for await (const o of s3.store.list(`datasets/emoji/${label}/`)) return o.key.slice(`datasets/emoji/${label}/`.length);
    throw new Error(`no ${label} image`);
  }
  const row = (page: Page, v: string) => page.locator(`#versions tr[data-version="${v}"]`);
  /** The newest request row once the dispatcher's outcome is in (pending rows poll every 1.5 s). */
  async function outcome(page: Page, action: string): Promise<string> {
    const done = page.locator("#requests-table tbody tr:not([data-state=pending])", { hasText: action }).first();
    // A child process starts Node and tfjs for each request: slow on a loaded machine, never a timing claim.
    await done.waitFor({ timeout: 120_000 });
    return (await done.textContent()) ?? "";
  }

  it("serves an older version, then rolls back, showing each request until it is done", async () => {
    const { page, problems } = await modelPage();
    expect(await row(page, v2).locator("button.serve").count()).toBe(0); // the served one has nothing to serve
    await row(page, v1).locator("button.serve").click();
    await page.waitForSelector("#requests-table tr[data-state=pending]");
    expect(await page.textContent("#requests-table")).toContain("waiting for the dispatcher");
    expect(await outcome(page, `Serve ${v1}`)).toContain(`done: emoji now serves ${v1} (was ${v2})`);
    // Done: the page reloads its versions, and the served badge moved.
    await row(page, v1).locator(".badge").waitFor();
    expect((await readPointer(s3.store, "emoji"))?.version).toBe(v1);
    await page.click("#action-rollback");
    expect(await outcome(page, "Roll back")).toContain(`done: emoji now serves ${v2}`);
    await row(page, v2).locator(".badge").waitFor();
    expect(problems).toEqual([]);
    await page.close();
  }, 300_000);

  it("trains now (a run of the model's dataset joins the training queue) and applies reviewed captures", async () => {
    const { page, problems } = await modelPage();
    await page.click("#action-train");
    expect(await outcome(page, "Train now")).toContain("done: A training run of dataset emoji is queued");
    await dispatcher.idle(); // the training it queued, before the next request shares the cores with it
    expect(dispatcher.jobs.find((j) => j.reason === "train-now")).toMatchObject({ dataset: "emoji", status: "succeeded" });
    await page.click("#action-apply-reviewed");
    expect(await outcome(page, "Apply reviewed captures")).toContain("done: 0 added to the dataset, 0 discarded.");
    expect(problems).toEqual([]);
    await page.close();
  }, 300_000);

  it("shows a refused request with its reason (one written with the edge's S3 key alone, unsigned by an operator)", async () => {
    const issuedAt = new Date().toISOString();
    const pointer = (await readPointer(s3.store, "emoji")) as ModelPointer;
    const unsigned = {
      id: `${issuedAt.slice(0, 19).replace(/[-:]/g, "")}-0badc0de`,
      model: "emoji",
      kind: "promote" as const,
      version: v1,
      from: pointer.version,
      fromPromotedAt: pointer.promotedAt,
      issuedAt,
    };
    const forged: OperatorRequest = {
      schemaVersion: 1,
      ...unsigned,
      by: "console",
      signature: await hmacSha256Hex("the-edge-s3-key", requestMessage(unsigned)),
    };
    await s3.store.put(keys.captureRequest("emoji", forged.id), JSON.stringify(forged));
    const { page, problems } = await modelPage();
    const refused = page.locator(`#requests-table tr[data-request="${forged.id}"][data-state=refused]`);
    await refused.waitFor({ timeout: 60_000 });
    expect(await refused.textContent()).toContain("refused: It is not signed by a current operator key");
    expect((await readPointer(s3.store, "emoji"))?.version).toBe(v2);
    expect(problems).toEqual([]);
    await page.close();
  }, 300_000);

  it("exports a version and downloads the ONNX file from its row, and fits a 360 px phone", async () => {
    const { page, problems } = await modelPage();
    expect(await row(page, v1).locator("a.download").count()).toBe(0);
    // A classified image stays on the page: an export done adds its row's link, it does not redraw the page.
    const image = (await s3.store.get(`datasets/emoji/food/${await firstImage("food")}`)) as Uint8Array;
    await page.setInputFiles("#classify-file", { name: "food.png", mimeType: "image/png", buffer: Buffer.from(image) });
    await page.waitForSelector("#classify-result .bar");
    await row(page, v1).locator("button.export").click();
    expect(await outcome(page, `Export ONNX ${v1}`)).toMatch(/done: emoji v[0-9a-f]{12} exported as ONNX \(opset \d+, \d+\.\d MB/);
    const link = row(page, v1).locator("a.download");
    await link.waitFor();
    expect(await link.textContent()).toMatch(/^Download ONNX \(\d+\.\d MB\)$/);
    expect(await page.locator("#classify-result .bar").count()).toBeGreaterThan(0);
    const [download] = await Promise.all([page.waitForEvent("download"), link.click()]);
    expect(download.suggestedFilename()).toBe(`emoji-${v1}.onnx`);
    const saved = new Uint8Array(await readFile((await download.path()) as string));
    expect(await sha256Hex(saved)).toBe(await sha256Hex((await s3.store.get(keys.versionOnnx("emoji", v1))) as Uint8Array));
    // With the actions, the requests and a download link, the page still fits a phone.
    await page.setViewportSize({ width: 360, height: 740 });
    expect(await layoutProblems(page)).toEqual([]);
    expect(problems).toEqual([]);
    await page.close();
  }, 300_000);
});
