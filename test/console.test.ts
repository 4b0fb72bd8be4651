import type { Browser, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { sha256Hex } from "#shared/hash.ts";
import { type EdgeWorker, startEdgeWorker } from "../infra/local/edge-worker.ts";
import { type LocalS3, startLocalS3 } from "../infra/local/s3-server.ts";
import { memoryLogger } from "../jobs/train/src/log.ts";
import { applyDecisions, listCaptures, processTraffic, writeCaptureConfig } from "../jobs/train/src/traffic/traffic.ts";
import { train } from "../jobs/train/src/train.ts";
import { haveBrowser, launchChromium, openPage } from "./support/browser.ts";
import { uploadSample } from "./support/datasets.ts";
import { postClassify } from "./support/edge.ts";

/**
 * The web console in a real headless Chromium (Debian's `chromium` package, driven by playwright-core)
 * against the worker in workerd and a really trained model in the local S3 server. `.ci/run` installs
 * Chromium and sets EDGETUNE_REQUIRE_BROWSER=1, so in CI a missing browser fails instead of skipping.
 */

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
    edge = await startEdgeWorker({
      s3Endpoint: s3.endpoint,
      bucket: s3.config.bucket,
      pointerTtlSeconds: 1,
      vars: { CONSOLE_API_KEYS: OPERATOR, COUNTERS_FLUSH_SECONDS: "0" },
    });
    browser = await launchChromium();
  });
  afterAll(async () => {
    await browser?.close();
    await edge?.stop();
    await s3?.stop();
  });

  /** A fresh page (own session storage) that records CSP violations and script errors. */
  const open = () => openPage(browser, `${edge.url}/`);

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
    expect(await row.textContent()).toMatch(/\d+\.\d\u00a0%/);
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
    // The answer in words first: a label with its threshold, or unsure.
    expect(await page.textContent("#classify-answer")).toMatch(
      /^(Answer: (animals|food|travel)( \(threshold \d+\.\d\u00a0%\))?|Unsure: the best label, \w+ \(\d+\.\d\u00a0%\), is below its threshold of \d+\.\d\u00a0%\.)$/,
    );
    expect(problems).toEqual([]);
    await page.close();
  });

  it("hints at the key without alarm, says plainly that a dropped file is not an image, and fits a 360 px phone", async () => {
    const { page, problems } = await open();
    await page.waitForSelector("#status:not(:empty)");
    expect(await page.getAttribute("#status", "class")).toBe("muted"); // a hint, not the red of an error
    await withKey(page);
    await page.goto(`${edge.url}/#/models/emoji`);
    await page.waitForSelector("#classify-file");
    await page.setInputFiles("#classify-file", { name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from("hello") });
    await page.waitForSelector("#classify-result .error");
    expect(await page.textContent("#classify-result")).toBe("notes.txt is not an image: drop a JPEG, PNG, WebP or GIF file.");
    // At 360 px nothing widens the page: wide tables scroll inside themselves, the header wraps.
    await page.setViewportSize({ width: 360, height: 740 });
    for (const path of ["#/", "#/models/emoji", `#/models/emoji/${version}`]) {
      await page.goto(`${edge.url}/${path}`);
      await page.waitForSelector("#view table");
      expect([path, await page.evaluate(() => document.documentElement.scrollWidth)]).toEqual([path, 360]);
    }
    expect(problems).toEqual([]);
    await page.close();
  });

  it("shows a version's report: accuracy, a confusion matrix with a row per label", async () => {
    const { page, problems } = await open();
    await withKey(page);
    await page.goto(`${edge.url}/#/models/emoji/${version}`);
    await page.waitForSelector("#confusion");
    expect(await page.textContent("#summary")).toMatch(/Accuracy \d+\.\d\u00a0%/);
    expect(await page.locator("#confusion tbody tr").count()).toBe(3);
    expect(await page.locator("#per-class tbody tr").count()).toBe(3);
    expect(await page.textContent("#answers-summary")).toMatch(/calibration error \d+\.\d\u00a0% before, \d+\.\d\u00a0% after\. Thresholds \(f1\)/);
    expect(await page.textContent("#export code")).toBe(`npx edgetune export emoji ${version}`);
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
    for (const path of [`/v1/models/emoji/versions`, `/v1/models/emoji/versions/${version}/report`, "/v1/models/emoji/captures", "/v1/models/emoji/monitor"]) {
      expect((await fetch(`${edge.url}${path}`, { headers: { authorization: `Bearer ${edge.apiKey}` } })).status).toBe(403);
    }
    // The route's own errors still come through for an operator (not turned into 403).
    expect((await fetch(`${edge.url}/v1/models/nope/versions`, { headers: { authorization: `Bearer ${OPERATOR}` } })).status).toBe(404);
    expect((await list("not-a-key")).status).toBe(401);
    const img = images[0] as (typeof images)[number];
    for (const key of [edge.apiKey, OPERATOR]) {
      const res = await postClassify(edge, "emoji", img, { authorization: `Bearer ${key}` });
      expect(res.status).toBe(200);
    }
  });

  it("reviews captured traffic (images, accept under a corrected label, discard) and shows the monitoring summary", async () => {
    await writeCaptureConfig(s3.store, "emoji", { enabled: true, belowConfidence: 1.01 });
    // The worker re-reads capture settings after its TTL (1 s here), after an answer: one answer to start it.
    await new Promise((r) => setTimeout(r, 1100));
    await postClassify(edge, "emoji", images.find((i) => i.file.endsWith(".png")) as (typeof images)[number], { "x-edgetune-capture": "off" });
    await new Promise((r) => setTimeout(r, 300));
    const sent = images.slice(0, 3);
    for (const img of sent) {
      const res = await postClassify(edge, "emoji", img);
      expect(res.status).toBe(200);
    }
    for (let i = 0; i < 100 && (await listCaptures(s3.store, "emoji")).length < sent.length; i++) await new Promise((r) => setTimeout(r, 100));
    const { page, problems } = await open();
    await withKey(page);
    await page.goto(`${edge.url}/#/models/emoji`);
    await page.click("#review-link");
    await page.waitForSelector("#captures");
    await page.waitForFunction((n) => document.querySelectorAll('#captures img[src^="blob:"]').length === n, sent.length);
    expect(await page.textContent("#capture-settings")).toContain("Capture is on: answers scored below 1.01 (a number set with edgetune capture --below)");
    const first = page.locator("#captures figure").nth(0);
    const predicted = (await first.locator("select").inputValue()) as string;
    const corrected = ["animals", "food", "travel"].find((l) => l !== predicted) as string;
    await first.locator("select").selectOption(corrected);
    await first.locator("button.accept").click();
    await page.waitForFunction(() => document.querySelector("#captures figure .outcome")?.textContent?.includes("Accepted as"));
    await page.locator("#captures figure").nth(1).locator("button.discard").click();
    await page.waitForFunction(() => document.querySelectorAll("#captures figure.decided").length === 2);
    // The third image is swapped (with the edge's credentials) after it was shown: its accept is refused.
    const third = page.locator("#captures figure").nth(2);
    const swappedId = (await third.getAttribute("data-id")) as string;
    const queue = await listCaptures(s3.store, "emoji");
    const swapped = queue.find((c) => c.id === swappedId) as (typeof queue)[number];
    const original = (await s3.store.get(swapped.image.key)) as Uint8Array;
    await s3.store.put(swapped.image.key, (await s3.store.get(queue.find((c) => c.id !== swappedId)?.image.key as string)) as Uint8Array);
    await third.locator("button.accept").click();
    await page.waitForFunction(() => document.querySelectorAll("#captures figure .outcome.error").length === 1);
    expect(await third.locator(".outcome").textContent()).toContain("is not the one you were shown");
    const decided = (await listCaptures(s3.store, "emoji")).filter((c) => c.decision);
    expect(decided.map((c) => [c.decision?.action, c.decision?.label ?? null, c.decision?.by]).sort()).toEqual([
      ["accept", corrected, "console"],
      ["discard", null, "console"],
    ]);
    // The accept names the bytes the page showed; swapped after the decision, the nightly job refuses it.
    const accepted = decided.find((c) => c.decision?.action === "accept") as (typeof decided)[number];
    expect(accepted.decision?.imageSha256).toBe(await sha256Hex((await s3.store.get(accepted.image.key)) as Uint8Array));
    await s3.store.put(accepted.image.key, original);
    const applied = await applyDecisions(s3.store, "emoji", memoryLogger(), { operatorKeys: [OPERATOR] });
    expect([applied.accepted, applied.discarded.length]).toEqual([[], 1]);
    expect(applied.refused).toEqual([{ id: accepted.id, reason: "its image changed after it was reviewed; review it again" }]);
    // No summary before the nightly step; then the day's traffic with the held-out reference.
    await page.goto(`${edge.url}/#/monitor/emoji`);
    await page.waitForSelector("#monitor-empty");
    await processTraffic(s3.store, memoryLogger(), [OPERATOR]);
    await page.reload();
    await page.waitForSelector("#monitor tbody tr");
    expect(await page.textContent("#monitor tbody tr")).toMatch(/\d{4}-\d{2}-\d{2}/);
    expect(await page.textContent("#reference")).toContain(version);
    expect(await page.textContent("#view")).not.toMatch(/null|undefined|NaN/);
    // Chromium logs the monitor route's 404 (no summary yet, shown to the user as such) and the swapped
    // image's 409 (shown on its card) as console errors.
    expect(problems.filter((p) => !p.includes("status of 404") && !p.includes("status of 409"))).toEqual([]);
    await page.close();
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
