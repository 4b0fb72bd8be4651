import { existsSync } from "node:fs";
import { type Browser, chromium, type Page } from "playwright-core";

/**
 * Headless Chromium for the console's tests and its README screenshots: Debian's `chromium` package
 * (or EDGETUNE_CHROMIUM), driven by playwright-core. `.ci/run` installs it and sets
 * EDGETUNE_REQUIRE_BROWSER=1, so in CI a missing browser fails instead of skipping.
 */
export const CHROMIUM = process.env.EDGETUNE_CHROMIUM ?? "/usr/bin/chromium";
export const haveBrowser = existsSync(CHROMIUM);
if (!haveBrowser && process.env.EDGETUNE_REQUIRE_BROWSER === "1") throw new Error(`Chromium not found at ${CHROMIUM} (apt-get install chromium)`);

export function launchChromium(): Promise<Browser> {
  // No sandbox as root, and no background connections that a closed network would refuse.
  return chromium.launch({
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
}

/**
 * A fresh page (own session storage) at `url` that records script errors and console errors, so a test
 * can assert the page ran clean; `key` is typed into the console's key form first, as a user does.
 */
export async function openPage(browser: Browser, url: string, options: { width?: number; key?: string } = {}): Promise<{ page: Page; problems: string[] }> {
  const page = await browser.newPage(options.width ? { viewport: { width: options.width, height: 800 } } : {});
  const problems: string[] = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  await page.goto(url);
  if (options.key) {
    await page.fill("#api-key", options.key);
    await page.click("#key-form button[type=submit]");
  }
  return { page, problems };
}

/**
 * What breaks a narrow layout, measured in the page: the page wider than the viewport (horizontal
 * scrolling of the whole page), the header cut at the right edge, and a percentage ("100.0 %") or a
 * version id broken over two lines. Empty when the page fits.
 */
export async function layoutProblems(page: Page): Promise<string[]> {
  return page.evaluate(() => {
    const problems: string[] = [];
    const width = document.documentElement.clientWidth;
    const scrollWidth = document.documentElement.scrollWidth;
    if (scrollWidth > width) problems.push(`page ${scrollWidth} px wide in a ${width} px viewport`);
    for (const node of document.querySelectorAll("header h1, header input, header button:not([hidden])")) {
      // The box and its text: text that overflows its box is cut too.
      const text = document.createRange();
      text.selectNodeContents(node);
      const rects = [node.getBoundingClientRect(), ...text.getClientRects()];
      const left = Math.min(...rects.map((r) => r.left));
      const right = Math.max(...rects.map((r) => r.right));
      if (right > width + 0.5 || left < -0.5) problems.push(`header ${node.tagName.toLowerCase()} cut (${Math.round(left)}–${Math.round(right)} px)`);
    }
    // Text nodes that read as one word for people: a number with its % sign, a version id.
    const walker = document.createTreeWalker(document.getElementById("view") ?? document.body, NodeFilter.SHOW_TEXT);
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
      for (const m of (n.textContent ?? "").matchAll(/[−+±]?\d+(\.\d+)?[ \u00a0]%|v[0-9a-f]{12}/g)) {
        const range = document.createRange();
        range.setStart(n, m.index);
        range.setEnd(n, m.index + m[0].length);
        const lines = new Set([...range.getClientRects()].filter((r) => r.width > 0).map((r) => Math.round(r.top)));
        if (lines.size > 1) problems.push(`"${m[0]}" wraps over ${lines.size} lines`);
      }
    }
    return problems;
  });
}
