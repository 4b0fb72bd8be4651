import { existsSync } from "node:fs";
import { type Browser, chromium, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type EdgeWorker, startEdgeWorker } from "../infra/local/edge-worker.ts";
import { type LocalS3, startLocalS3 } from "../infra/local/s3-server.ts";
import { memoryLogger } from "../jobs/train/src/log.ts";
import { train } from "../jobs/train/src/train.ts";
import { uploadSample } from "./support/datasets.ts";

/**
 * The web console in a real headless Chromium (Debian's `chromium` package, driven by playwright-core)
 * against the worker in workerd and a really trained model in the local S3 server. `.ci/run` installs
 * Chromium and sets EDGETUNE_REQUIRE_BROWSER=1, so in CI a missing browser fails instead of skipping.
 */
const CHROMIUM = process.env.EDGETUNE_CHROMIUM ?? "/usr/bin/chromium";
const haveBrowser = existsSync(CHROMIUM);
if (!haveBrowser && process.env.EDGETUNE_REQUIRE_BROWSER === "1") throw new Error(`Chromium not found at ${CHROMIUM} (apt-get install chromium)`);

let s3: LocalS3;
let edge: EdgeWorker;
let browser: Browser;
let images: Awaited<ReturnType<typeof uploadSample>>;
let version: string;
const OPERATOR = "operator-key-0123456789";

describe.skipIf(!haveBrowser)("web console (headless Chromium)", () => {
  beforeAll(async () => {
    s3 = await startLocalS3();
    images = await uploadSample(s3.store, "emoji", { perLabel: 12, size: 96 });
    const r = await train(s3.store, { dataset: "emoji", imageSize: 96, views: 1, head: { epochs: 15 }, promote: "always" }, memoryLogger());
    version = r.version;
    // edge.apiKey is a client's (classify only); OPERATOR also opens the console's listings.
    edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, vars: { CONSOLE_API_KEYS: OPERATOR } });
    // The flags the machine notes ask for: no sandbox as root, and no background connections that a
    // closed network would refuse.
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
  });
  afterAll(async () => {
    await browser?.close();
    await edge?.stop();
    await s3?.stop();
  });

  /** A fresh page (own session storage) that records CSP violations and script errors. */
  async function open(): Promise<{ page: Page; problems: string[] }> {
    const page = await browser.newPage();
    const problems: string[] = [];
    page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    page.on("console", (m) => {
      if (m.type() === "error") problems.push(`console: ${m.text()}`);
    });
    await page.goto(`${edge.url}/`);
    return { page, problems };
  }

  async function withKey(page: Page, key = OPERATOR) {
    await page.fill("#api-key", key);
    await page.click("#key-form button[type=submit]");
  }

  it("is served with a strict Content-Security-Policy and asks for a key first", async () => {
    const res = await fetch(`${edge.url}/`);
    const csp = res.headers.get("content-security-policy") ?? "";
    expect(csp).toContain("default-src 'none'");
    expect(csp).toContain("script-src 'self'");
    expect(csp).not.toContain("unsafe-inline");
    expect(csp).not.toContain("unsafe-eval");
    const { page, problems } = await open();
    await expect(page.textContent("#status")).resolves.toContain("Paste an API key");
    expect(problems).toEqual([]);
    await page.close();
  });

  it("lists models, then a model's versions with the served one marked", async () => {
    const { page, problems } = await open();
    await withKey(page);
    await page.waitForSelector("#models a");
    expect(await page.textContent("#models")).toContain(version);
    await page.click("#models a");
    await page.waitForSelector("#versions");
    const row = page.locator(`#versions tr[data-version="${version}"]`);
    await expect(row.textContent()).resolves.toContain("served");
    expect(await row.textContent()).toMatch(/\d+\.\d %/);
    expect(await page.textContent("#view")).not.toMatch(/null|undefined|NaN/);
    expect(problems).toEqual([]);
    await page.close();
  });

  it("classifies a dropped image through the API and shows the scores", async () => {
    const { page, problems } = await open();
    await withKey(page);
    await page.goto(`${edge.url}/#/models/emoji`);
    await page.waitForSelector("#classify-file");
    const img = images.find((i) => i.file.endsWith(".png")) as (typeof images)[number];
    await page.setInputFiles("#classify-file", { name: "test.png", mimeType: "image/png", buffer: Buffer.from(img.bytes) });
    await page.waitForSelector("#classify-result .bar");
    const labels = await page.locator("#classify-result .bar span:first-child").allTextContents();
    expect(labels.length).toBe(3);
    expect(labels.sort()).toEqual(["animals", "food", "travel"]);
    // The picture shown is the file itself, through a blob: URL the CSP allows.
    expect(await page.getAttribute("#classify-result img", "src")).toMatch(/^blob:/);
    expect(await page.textContent("#classify-result")).toContain(version);
    expect(problems).toEqual([]);
    await page.close();
  });

  it("shows a version's report: accuracy, a confusion matrix with a row per label", async () => {
    const { page, problems } = await open();
    await withKey(page);
    await page.goto(`${edge.url}/#/models/emoji/${version}`);
    await page.waitForSelector("#confusion");
    expect(await page.textContent("#summary")).toMatch(/Accuracy \d+\.\d %/);
    expect(await page.locator("#confusion tbody tr").count()).toBe(3);
    expect(await page.locator("#per-class tbody tr").count()).toBe(3);
    expect(problems).toEqual([]);
    // For the README: EDGETUNE_SCREENSHOT=docs/console.png npx vitest run test/console.test.ts
    if (process.env.EDGETUNE_SCREENSHOT) {
      await page.goto(`${edge.url}/#/models/emoji`);
      await page.setInputFiles("#classify-file", { name: "test.png", mimeType: "image/png", buffer: Buffer.from(images[0]?.bytes ?? []) });
      await page.waitForSelector("#classify-result .bar");
      await page.setViewportSize({ width: 1100, height: 760 });
      await page.screenshot({ path: process.env.EDGETUNE_SCREENSHOT, fullPage: false });
    }
    await page.close();
  });

  it("opens listings to operator keys only; a client's key classifies but cannot list", async () => {
    const list = (key: string) => fetch(`${edge.url}/v1/models`, { headers: { authorization: `Bearer ${key}` } });
    expect((await list(OPERATOR)).status).toBe(200);
    const refused = await list(edge.apiKey);
    expect(refused.status).toBe(403);
    expect(((await refused.json()) as { error: { code: string } }).error.code).toBe("forbidden");
    for (const path of [`/v1/models/emoji/versions`, `/v1/models/emoji/versions/${version}/report`]) {
      expect((await fetch(`${edge.url}${path}`, { headers: { authorization: `Bearer ${edge.apiKey}` } })).status).toBe(403);
    }
    // The route's own errors still come through for an operator (not turned into 403).
    expect((await fetch(`${edge.url}/v1/models/nope/versions`, { headers: { authorization: `Bearer ${OPERATOR}` } })).status).toBe(404);
    expect((await list("not-a-key")).status).toBe(401);
    const img = images[0] as (typeof images)[number];
    for (const key of [edge.apiKey, OPERATOR]) {
      const res = await fetch(`${edge.url}/v1/models/emoji/classify`, {
        method: "POST",
        headers: { authorization: `Bearer ${key}`, "content-type": img.file.endsWith(".jpg") ? "image/jpeg" : "image/png" },
        body: img.bytes as BodyInit,
      });
      expect(res.status).toBe(200);
    }
  });

  it("says what is wrong with a bad key or an unknown model, and forgets the key on request", async () => {
    const { page } = await open();
    await withKey(page, "not-a-real-key");
    await page.waitForSelector("#status.error");
    expect(await page.textContent("#status")).toMatch(/key/i);
    await withKey(page, edge.apiKey);
    await page.waitForFunction(() => document.querySelector("#status")?.textContent?.includes("may classify but not list"));
    await withKey(page);
    await page.goto(`${edge.url}/#/models/nope`);
    await page.waitForFunction(() => document.querySelector("#status")?.textContent?.includes("nope"));
    await page.click("#forget-key");
    await page.waitForFunction(() => document.querySelector("#status")?.textContent?.includes("Paste an API key"));
    expect(await page.evaluate(() => sessionStorage.length)).toBe(0);
    await page.close();
  });
});
