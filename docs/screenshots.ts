#!/usr/bin/env node
/**
 * The README's console screenshots, taken again: `npm run docs:screenshots` (needs Chromium, as the
 * console's tests: Debian's `chromium` or EDGETUNE_CHROMIUM). It trains two small versions of the sample
 * dataset (the second after images were added, so their held-out images differ) in a local S3 server,
 * starts the worker in workerd, and shoots in headless Chromium:
 *   docs/console.png          a model's page at 1280 px: a classified image, the actions with an export
 *                             done (applied here as the dispatcher would), the versions, Compare;
 *   docs/console-compare.png  two versions side by side at 1280 px;
 *   docs/console-phone.png    the comparison at 360 px (a phone).
 * Each page is checked with the tests' layout check first (nothing wider than the screen, no wrapped
 * percentage), and the PNGs are re-encoded with a 256-colour palette (sharp) to stay small.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { Page } from "playwright-core";
import sharp from "sharp";
import { startEdgeWorker } from "../infra/local/edge-worker.ts";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { memoryLogger } from "../jobs/train/src/log.ts";
import { applyRequests } from "../jobs/train/src/requests/requests.ts";
import { train } from "../jobs/train/src/train.ts";
import { haveBrowser, launchChromium, layoutProblems } from "../test/support/browser.ts";
import { uploadSample } from "../test/support/datasets.ts";
import { SHARED_MODELS } from "../test/support/shared.ts";

const OUT = import.meta.dirname;
const OPERATOR = "screenshot-operator-key";

if (!haveBrowser) {
  process.stderr.write("Chromium is needed for the screenshots: apt-get install chromium, or set EDGETUNE_CHROMIUM.\n");
  process.exit(1);
}
process.env.EDGETUNE_OFFLINE ||= "1";
// The reference bases beside the clone, as npm start and the tests use them; else the nsfwjs base.
if (existsSync(SHARED_MODELS)) process.env.EDGETUNE_BASES_DIR ||= SHARED_MODELS;

const s3 = await startLocalS3();
const stops: (() => Promise<unknown>)[] = [() => s3.stop()];
try {
  const images = await uploadSample(s3.store, "emoji", { perLabel: 16, size: 128 });
  const options = { dataset: "emoji", imageSize: 128 as const, views: 1, head: { epochs: 15 } };
  const first = await train(s3.store, { ...options, promote: "always" }, memoryLogger());
  await uploadSample(s3.store, "emoji", { perLabel: 8, offset: 16, size: 128 });
  const second = await train(s3.store, { ...options, promote: "always" }, memoryLogger());
  const edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, vars: { CONSOLE_API_KEYS: OPERATOR } });
  stops.push(() => edge.stop());
  const browser = await launchChromium();
  stops.push(() => browser.close());

  const shoot = async (width: number, height: number, path: string, file: string, prepare?: (page: Page) => Promise<void>) => {
    const page = await browser.newPage({ viewport: { width, height } });
    await page.goto(`${edge.url}/`);
    await page.fill("#api-key", OPERATOR);
    await page.click("#key-form button[type=submit]");
    await page.goto(`${edge.url}/${path}`);
    await page.waitForSelector("#view h2");
    await prepare?.(page);
    await page.waitForLoadState("networkidle");
    const problems = await layoutProblems(page);
    if (problems.length) throw new Error(`${path} at ${width} px: ${problems.join("; ")}`);
    const png = await page.screenshot({ fullPage: false });
    const { size } = await sharp(png).png({ palette: true, colours: 256, compressionLevel: 9, effort: 10 }).toFile(join(OUT, file));
    process.stdout.write(`${file}: ${width}×${height}, ${(size / 1024).toFixed(0)} KB (${(png.length / 1024).toFixed(0)} KB as Chromium wrote it)\n`);
    await page.close();
  };

  const image = images.find((i) => i.file.endsWith(".png"));
  await shoot(1280, 1150, "#/models/emoji", "console.png", async (page) => {
    await page.setInputFiles("#classify-file", { name: "emoji.png", mimeType: "image/png", buffer: Buffer.from(image?.bytes ?? []) });
    await page.waitForSelector("#classify-result .bar", { timeout: 90_000 });
    // An action and its outcome: Export ONNX on the served version, applied as the dispatcher applies it.
    await page.locator(`#versions tr[data-version="${second.version}"] button.export`).click();
    await page.waitForSelector("#requests-table tr[data-state=pending]");
    await applyRequests(s3.store, "emoji", { log: memoryLogger(), operatorKeys: [OPERATOR], train: async () => "" });
    await page.waitForSelector(`#versions tr[data-version="${second.version}"] a.download`, { timeout: 30_000 });
  });
  const compare = `#/compare/emoji/${first.version}/${second.version}`;
  await shoot(1280, 1000, compare, "console-compare.png", (page) => page.waitForSelector("#compare-confusion").then(() => {}));
  await shoot(360, 780, compare, "console-phone.png", (page) => page.waitForSelector("#compare-confusion").then(() => {}));
} finally {
  for (const stop of stops.reverse()) await stop().catch(() => {});
}
