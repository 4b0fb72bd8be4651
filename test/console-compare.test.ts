import type { Browser } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readMetadata } from "#shared/artifacts.ts";
import type { ArtifactMetadata } from "#shared/contracts/artifact.ts";
import { keys } from "#shared/keys.ts";
import { type EdgeWorker, startEdgeWorker } from "../infra/local/edge-worker.ts";
import { type LocalS3, startLocalS3 } from "../infra/local/s3-server.ts";
import { memoryLogger } from "../jobs/train/src/log.ts";
import { train } from "../jobs/train/src/train.ts";
import { haveBrowser, launchChromium, layoutProblems, openPage } from "./support/browser.ts";
import { uploadSample } from "./support/datasets.ts";

/**
 * Two versions side by side and the models list with accuracy: the worker's routes in real workerd
 * (operator and client keys, unknown model or version), then the console in headless Chromium at a
 * desktop (1280 px) and a phone (360 px) width, on versions really trained here: `same` and `tuned` on
 * the same held-out images (another number of epochs), `grown` after images were added (other ones).
 */
let s3: LocalS3;
let edge: EdgeWorker;
let images: Awaited<ReturnType<typeof uploadSample>>;
const OPERATOR = "operator-key-compare-0123";
const v: Record<"same" | "tuned" | "grown", ArtifactMetadata> = {} as never;

const get = (path: string, key = OPERATOR) => fetch(`${edge.url}${path}`, { headers: { authorization: `Bearer ${key}` } });
/** The console's percentage: one decimal and a no-break space. */
const pct = (x: number) => `${(x * 100).toFixed(1)}\u00a0%`;

beforeAll(async () => {
  s3 = await startLocalS3();
  images = await uploadSample(s3.store, "emoji", { perLabel: 12, size: 96 });
  const options = { dataset: "emoji", imageSize: 96 as const, views: 1 };
  const same = await train(s3.store, { ...options, head: { epochs: 15 }, promote: "always" }, memoryLogger());
  const tuned = await train(s3.store, { ...options, head: { epochs: 4 }, promote: "never" }, memoryLogger());
  await uploadSample(s3.store, "emoji", { perLabel: 8, offset: 12, size: 96 });
  const grown = await train(s3.store, { ...options, head: { epochs: 15 }, promote: "never" }, memoryLogger());
  for (const [k, r] of Object.entries({ same, tuned, grown })) v[k as keyof typeof v] = await readMetadata(s3.store, "emoji", r.version);
  edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket, pointerTtlSeconds: 1, vars: { CONSOLE_API_KEYS: OPERATOR } });
});
afterAll(async () => {
  await edge?.stop();
  await s3?.stop();
});

describe("version comparison and the models list (worker in workerd)", () => {
  it("were trained as the comparison needs: the same held-out images, then other ones", () => {
    expect(new Set(Object.values(v).map((m) => m.version)).size).toBe(3);
    expect(v.same.metrics.heldOutSha256).toMatch(/^[0-9a-f]{64}$/);
    expect(v.tuned.metrics.heldOutSha256).toBe(v.same.metrics.heldOutSha256);
    expect(v.grown.metrics.heldOutSha256).not.toBe(v.same.metrics.heldOutSha256);
    expect(v.grown.metrics.evaluatedOn).toBeGreaterThan(v.same.metrics.evaluatedOn);
  });

  it("compares two versions: both versions' numbers as trained, and says when the held-out images differ", async () => {
    const res = await get(`/v1/models/emoji/versions/${v.same.version}/compare/${v.grown.version}`);
    expect(res.status).toBe(200);
    const body = (await res.json()) as {
      versions: { version: string; current: boolean; accuracy: number; evaluatedOn: number; perClass: object; confusion: number[][]; labels: string[] }[];
      heldOut: { same: boolean | null; message: string };
    };
    expect(body.versions.map((x) => [x.version, x.current, x.accuracy, x.evaluatedOn, x.perClass, x.labels])).toEqual(
      [v.same, v.grown].map((m) => [m.version, m === v.same, m.metrics.accuracy, m.metrics.evaluatedOn, m.metrics.perClass, m.labels]),
    );
    // The confusion matrix as recorded in the metadata: a row per label, as many answers as held-out images, the diagonal the right ones.
    expect(body.versions.map((x) => x.confusion)).toEqual([v.same.metrics.confusion, v.grown.metrics.confusion]);
    body.versions.forEach((x) => {
      expect(x.confusion.length).toBe(x.labels.length);
      expect(x.confusion.flat().reduce((a, b) => a + b, 0)).toBe(x.evaluatedOn);
      expect(x.confusion.reduce((a, row, i) => a + (row[i] as number), 0)).toBe(Math.round(x.accuracy * x.evaluatedOn));
    });
    expect(body.heldOut.same).toBe(false);
    expect(body.heldOut.message).toContain("different held-out images");
    expect(body.heldOut.message).toContain(`${v.same.metrics.evaluatedOn} and ${v.grown.metrics.evaluatedOn} held-out images`);

    const same = (await (await get(`/v1/models/emoji/versions/${v.tuned.version}/compare/${v.same.version}`)).json()) as typeof body;
    expect(same.heldOut).toEqual({
      same: true,
      message: `Both were measured on the same ${v.same.metrics.evaluatedOn} held-out images: a like-for-like comparison.`,
    });
    expect(same.versions.map((x) => x.version)).toEqual([v.tuned.version, v.same.version]);
  });

  it("answers 404 for an unknown model or version, 403 to a client key, 401 without a valid key", async () => {
    const notFound = async (path: string) => {
      const res = await get(path);
      return [res.status, ((await res.json()) as { error: { code: string } }).error.code];
    };
    expect(await notFound(`/v1/models/nope/versions/${v.same.version}/compare/${v.grown.version}`)).toEqual([404, "model_not_found"]);
    expect(await notFound(`/v1/models/emoji/versions/${v.same.version}/compare/v0123456789ab`)).toEqual([404, "version_not_found"]);
    expect(await notFound(`/v1/models/emoji/versions/${v.same.version}/compare/latest`)).toEqual([404, "version_not_found"]);
    const path = `/v1/models/emoji/versions/${v.same.version}/compare/${v.grown.version}`;
    const client = await get(path, edge.apiKey);
    expect(client.status).toBe(403);
    expect(((await client.json()) as { error: { code: string } }).error.code).toBe("forbidden");
    expect((await get(path, "not-a-key")).status).toBe(401);
    expect((await get("/v1/models", edge.apiKey)).status).toBe(403);
    const doc = (await (await fetch(`${edge.url}/openapi.json`)).json()) as { paths: Record<string, unknown> };
    expect(Object.keys(doc.paths)).toContain("/v1/models/{name}/versions/{version}/compare/{other}");
  });

  it("lists models with the served version and its accuracy, a page at a time", async () => {
    const page = (await (await get("/v1/models")).json()) as {
      models: { name: string; version: string | null; accuracy: number | null; evaluatedOn: number | null }[];
      next: string | null;
    };
    expect(page.models).toContainEqual(
      expect.objectContaining({ name: "emoji", version: v.same.version, accuracy: v.same.metrics.accuracy, evaluatedOn: v.same.metrics.evaluatedOn }),
    );
    expect(page.next).toBeNull();
    // 25 more models without a promoted version (a folder each): 20 a page, the rest after `next`.
    const extra = Array.from({ length: 25 }, (_, i) => `m${String(i).padStart(2, "0")}`);
    await Promise.all(extra.map((n) => s3.store.put(`${keys.model(n)}placeholder.txt`, "x")));
    try {
      const first = (await (await get("/v1/models")).json()) as typeof page;
      expect(first.models.map((m) => m.name)).toEqual(["emoji", ...extra].sort().slice(0, 20));
      expect(first.models.find((m) => m.name === "m00")).toEqual({ name: "m00", version: null, promotedAt: null, accuracy: null, evaluatedOn: null });
      expect(first.next).toBe(first.models.at(-1)?.name);
      const second = (await (await get(`/v1/models?after=${first.next}`)).json()) as typeof page;
      expect(second.models.map((m) => m.name)).toEqual(["emoji", ...extra].sort().slice(20));
      expect(second.next).toBeNull();
      const bad = await get("/v1/models?after=..%2F");
      expect([bad.status, ((await bad.json()) as { error: { code: string } }).error.code]).toEqual([422, "invalid_after"]);
    } finally {
      await s3.store.delete(extra.map((n) => `${keys.model(n)}placeholder.txt`));
    }
  });

  it("compares from the metadata alone: with both reports gone the answer is the same", async () => {
    const path = `/v1/models/emoji/versions/${v.same.version}/compare/${v.grown.version}`;
    const before = await (await get(path)).json();
    const reports = [v.same, v.grown].map((m) => keys.versionFile("emoji", m.version, "report.json"));
    const saved = await Promise.all(reports.map((k) => s3.store.get(k)));
    await s3.store.delete(reports);
    try {
      const res = await get(path);
      expect(res.status).toBe(200);
      expect(await res.json()).toEqual(before);
    } finally {
      await Promise.all(reports.map((k, i) => s3.store.put(k, saved[i] as Uint8Array)));
    }
  });

  it("reads an older version's matrix from its report; a report missing, too large or replaced costs that matrix only, with a note", async () => {
    const key = keys.metadata("emoji", v.tuned.version);
    const original = (await s3.store.get(key)) as Uint8Array;
    const { confusion, ...older } = v.tuned.metrics;
    const report = keys.versionFile("emoji", v.tuned.version, "report.json");
    const reportBytes = (await s3.store.get(report)) as Uint8Array;
    /** Metadata as a version trained before the matrix was recorded there, its report listed with `bytes`. */
    const olderWith = (bytes: number) =>
      s3.store.put(key, JSON.stringify({ ...v.tuned, metrics: older, files: v.tuned.files.map((f) => (f.path === "report.json" ? { ...f, bytes } : f)) }));
    const compare = async () => {
      const res = await get(`/v1/models/emoji/versions/${v.same.version}/compare/${v.tuned.version}`);
      expect(res.status).toBe(200);
      const [same, tuned] = ((await res.json()) as { versions: { confusion: number[][]; note?: string }[] }).versions;
      expect(same).toMatchObject({ confusion: v.same.metrics.confusion });
      expect(same?.note).toBeUndefined();
      return tuned as { confusion: number[][]; note?: string };
    };
    expect(confusion?.length).toBe(v.tuned.labels.length);
    try {
      await olderWith(reportBytes.length);
      expect(await compare()).toEqual(expect.objectContaining({ confusion }));
      await olderWith(9 * 2 ** 20);
      expect(await compare()).toMatchObject({ confusion: [], note: expect.stringContaining("9.0 MB, more than the 8 MB the worker reads") });
      // Listed smaller than it is: refused while it is read (it is not the file the metadata names).
      await olderWith(100);
      expect(await compare()).toMatchObject({
        confusion: [],
        note: `The report of emoji ${v.tuned.version} is not the one its metadata lists (corrupt or replaced).`,
      });
      const refused = await get(`/v1/models/emoji/versions/${v.tuned.version}/report`);
      expect([refused.status, ((await refused.json()) as { error: { code: string } }).error.code]).toEqual([422, "report_corrupt"]);
      await olderWith(reportBytes.length);
      await s3.store.delete([report]);
      expect(await compare()).toMatchObject({ confusion: [], note: `The report of emoji ${v.tuned.version} is missing from the bucket.` });
    } finally {
      await s3.store.put(key, original);
      await s3.store.put(report, reportBytes);
    }
  });

  it("says it is not known whether the held-out images are the same for a version trained before they were recorded", async () => {
    const key = keys.metadata("emoji", v.tuned.version);
    const original = (await s3.store.get(key)) as Uint8Array;
    const { heldOutSha256: _, ...older } = v.tuned.metrics;
    await s3.store.put(key, JSON.stringify({ ...v.tuned, metrics: older }));
    try {
      const body = (await (await get(`/v1/models/emoji/versions/${v.same.version}/compare/${v.tuned.version}`)).json()) as {
        heldOut: { same: boolean | null; message: string };
      };
      expect(body.heldOut.same).toBeNull();
      expect(body.heldOut.message).toContain(`not known: ${v.tuned.version} predates that record`);
    } finally {
      await s3.store.put(key, original);
    }
  });
});

describe.skipIf(!haveBrowser)("version comparison and the models list (console in headless Chromium)", () => {
  let browser: Browser;
  beforeAll(async () => {
    browser = await launchChromium();
  });
  afterAll(async () => {
    await browser?.close();
  });

  const open = (width: number) => openPage(browser, `${edge.url}/`, { width, key: OPERATOR });

  for (const width of [1280, 360]) {
    it(`at ${width} px: the models list shows the served version and its accuracy, the page fits`, async () => {
      const { page, problems } = await open(width);
      await page.waitForSelector('#models tr[data-model="emoji"]');
      const cells = await page.locator('#models tr[data-model="emoji"] td').allTextContents();
      expect(cells.slice(0, 4)).toEqual(["emoji", v.same.version, pct(v.same.metrics.accuracy), String(v.same.metrics.evaluatedOn)]);
      expect(await layoutProblems(page)).toEqual([]);
      expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(width);
      expect(problems).toEqual([]);
      await page.close();
    });

    it(`at ${width} px: compares two versions picked on the model's page, and says their held-out images differ`, async () => {
      const { page, problems } = await open(width);
      await page.goto(`${edge.url}/#/models/emoji`);
      await page.waitForSelector("#compare-a");
      // Default: the served version against the newest other one.
      expect(await page.inputValue("#compare-a")).toBe(v.same.version);
      await page.selectOption("#compare-b", v.grown.version);
      expect(await layoutProblems(page)).toEqual([]);
      await page.click("#compare-go");
      await page.waitForSelector("#compare-summary");
      expect(await page.textContent("#held-out")).toContain("different held-out images");
      expect(await page.getAttribute("#held-out", "class")).toContain("differs");
      const row = async (name: string) =>
        (await page.locator("#compare-summary tbody tr", { hasText: name }).first().locator("td").allTextContents()) as string[];
      expect(await row("Accuracy")).toEqual([pct(v.same.metrics.accuracy), pct(v.grown.metrics.accuracy)]);
      expect(await row("Held-out images")).toEqual([String(v.same.metrics.evaluatedOn), String(v.grown.metrics.evaluatedOn)]);
      expect(await row("Served")).toEqual(["yes", "no"]);
      for (const label of v.same.labels) {
        const cells = await page.locator(`#compare-per-label tr[data-label="${label}"] td`).allTextContents();
        const [a, b] = [v.same.metrics.perClass[label], v.grown.metrics.perClass[label]];
        expect(cells.slice(0, 3)).toEqual([label, pct(a?.precision as number), pct(b?.precision as number)]);
        expect(cells.slice(4, 6)).toEqual([pct(a?.recall as number), pct(b?.recall as number)]);
      }
      // Both confusion matrices, each counting its own held-out images.
      for (const m of [v.same, v.grown]) {
        const counts = await page.locator(`#compare-confusion figure[data-version="${m.version}"] tbody td`).allTextContents();
        expect(counts.length).toBe(m.labels.length ** 2);
        expect(counts.reduce((s, n) => s + Number(n), 0)).toBe(m.metrics.evaluatedOn);
      }
      expect(await page.textContent("#view")).not.toMatch(/null|undefined|NaN/);
      expect(await layoutProblems(page)).toEqual([]);
      expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(width);
      expect(problems).toEqual([]);
      await page.close();
    });
  }

  it("says plainly when two versions were measured on the same held-out images", async () => {
    const { page, problems } = await open(1280);
    await page.goto(`${edge.url}/#/compare/emoji/${v.same.version}/${v.tuned.version}`);
    await page.waitForSelector("#held-out");
    expect(await page.textContent("#held-out")).toBe(
      `Both were measured on the same ${v.same.metrics.evaluatedOn} held-out images: a like-for-like comparison.`,
    );
    expect(await page.getAttribute("#held-out", "class")).toContain("same");
    expect(problems).toEqual([]);
    await page.close();
  });

  it("shows a label named like a built-in property as any other, and why a matrix is missing", async () => {
    const key = keys.metadata("emoji", v.tuned.version);
    const original = (await s3.store.get(key)) as Uint8Array;
    const report = keys.versionFile("emoji", v.tuned.version, "report.json");
    const reportBytes = (await s3.store.get(report)) as Uint8Array;
    // tuned as an older version (no matrix in its metadata, no report) whose first label is named "constructor".
    const [first, ...rest] = v.tuned.labels as [string, ...string[]];
    const perClass = Object.fromEntries(Object.entries(v.tuned.metrics.perClass).map(([l, m]) => [l === first ? "constructor" : l, m]));
    const { confusion: _, ...older } = v.tuned.metrics;
    await s3.store.put(key, JSON.stringify({ ...v.tuned, labels: ["constructor", ...rest], metrics: { ...older, perClass } }));
    await s3.store.delete([report]);
    try {
      const { page, problems } = await open(1280);
      await page.goto(`${edge.url}/#/compare/emoji/${v.same.version}/${v.tuned.version}`);
      await page.waitForSelector("#compare-per-label");
      const row = (label: string) => page.locator(`#compare-per-label tr[data-label="${label}"] td`).allTextContents();
      const [a, b] = [v.same.metrics.perClass[first], v.tuned.metrics.perClass[first]] as { precision: number; recall: number; support: number }[];
      // Only tuned has "constructor", only same has the first label: the other's cells are empty, not NaN.
      expect(await row("constructor")).toEqual(["constructor", "–", pct(b?.precision as number), "–", "–", pct(b?.recall as number), "–", `– / ${b?.support}`]);
      expect(await row(first)).toEqual([first, pct(a?.precision as number), "–", "–", pct(a?.recall as number), "–", "–", `${a?.support} / –`]);
      expect(await page.textContent(`#compare-confusion figure[data-version="${v.tuned.version}"] p`)).toBe(
        `The report of emoji ${v.tuned.version} is missing from the bucket.`,
      );
      expect(await page.locator(`#compare-confusion figure[data-version="${v.same.version}"] tbody td`).count()).toBe(v.same.labels.length ** 2);
      expect(await page.textContent("#view")).not.toMatch(/null|undefined|NaN/);
      expect(problems).toEqual([]);
      await page.close();
    } finally {
      await s3.store.put(key, original);
      await s3.store.put(report, reportBytes);
    }
  });

  it("finds what breaks a narrow page: a page wider than the screen, a wrapped percentage, a cut header", async () => {
    const page = await browser.newPage({ viewport: { width: 360, height: 600 } });
    await page.setContent(
      `<body style="margin:0"><header><h1>edgetune</h1></header><section id="view"><p style="width:0">100.0 %</p><p style="width:0">100.0\u00a0%</p>` +
        `<div style="width:500px">wide</div></section></body>`,
    );
    expect(await layoutProblems(page)).toEqual(["page 500 px wide in a 360 px viewport", '"100.0 %" wraps over 2 lines']);
    await page.setContent(`<header><h1 style="margin-left:340px;white-space:nowrap">edgetune</h1></header><section id="view"></section>`);
    expect((await layoutProblems(page)).some((p) => p.startsWith("header h1 cut"))).toBe(true);
    await page.close();
  });

  it("pages the models list: More models adds the next page", async () => {
    const extra = Array.from({ length: 22 }, (_, i) => `p${String(i).padStart(2, "0")}`);
    await Promise.all(extra.map((n) => s3.store.put(`${keys.model(n)}placeholder.txt`, "x")));
    try {
      const { page, problems } = await open(360);
      await page.waitForSelector("#more-models");
      expect(await page.locator("#models tbody tr").count()).toBe(20);
      await page.click("#more-models");
      await page.waitForFunction((n) => document.querySelectorAll("#models tbody tr").length === n, extra.length + 1);
      expect(await page.locator("#more-models").count()).toBe(0);
      expect(await page.locator('#models tr[data-model="p00"] td').allTextContents()).toEqual(["p00", "none promoted", "–", "–", "—"]);
      expect(await layoutProblems(page)).toEqual([]);
      expect(problems).toEqual([]);
      await page.close();
    } finally {
      await s3.store.delete(extra.map((n) => `${keys.model(n)}placeholder.txt`));
    }
  });

  it("at 360 px: every console page fits (report, classify answer, review, monitor)", async () => {
    const { page } = await open(360);
    // Each page by an element only it has: a hash change leaves the previous page up until the next is drawn.
    const pages: [string, string][] = [
      ["#/", "#models"],
      ["#/models/emoji", "#versions"],
      [`#/models/emoji/${v.same.version}`, "#confusion"],
      [`#/compare/emoji/${v.same.version}/${v.grown.version}`, "#compare-confusion"],
      ["#/review/emoji", "#captures, #captures-empty"],
      ["#/monitor/emoji", "#monitor, #monitor-empty"],
    ];
    for (const [path, selector] of pages) {
      await page.goto(`${edge.url}/${path}`);
      await page.waitForSelector(selector);
      expect([path, await layoutProblems(page)]).toEqual([path, []]);
    }
    await page.close();
    // A classified image with its scores under it.
    const { page: fresh } = await open(360);
    await fresh.goto(`${edge.url}/#/models/emoji`);
    await fresh.waitForSelector("#versions");
    const img = images.find((i) => i.file.endsWith(".png")) as (typeof images)[number];
    await fresh.setInputFiles("#classify-file", { name: "test.png", mimeType: "image/png", buffer: Buffer.from(img.bytes) });
    await fresh.waitForSelector("#classify-result .bar, #classify-result .error", { timeout: 90_000 });
    expect(await fresh.locator("#classify-result .error").allTextContents()).toEqual([]);
    expect(await layoutProblems(fresh)).toEqual([]);
    await fresh.close();
  });
});
