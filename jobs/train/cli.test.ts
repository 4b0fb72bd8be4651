import { execFile, spawn } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { promisify } from "node:util";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPointer } from "#shared/artifacts.ts";
import { startEdgeWorker } from "../../infra/local/edge-worker.ts";
import { jobEnvironment } from "../../infra/local/job-env.ts";
import { type LocalS3, startLocalS3 } from "../../infra/local/s3-server.ts";
import { barePng } from "../../test/support/crafted-images.ts";
import { uploadSample } from "../../test/support/datasets.ts";
import { DEFAULT_OPTIONS } from "./src/config.ts";
import { memoryLogger } from "./src/log.ts";
import { train } from "./src/train.ts";

/** The CLI as a user meets it, against a real S3 API server: errors that say what to do, true defaults, rollback. */
const run = promisify(execFile);
let s3: LocalS3;
let work: string;
beforeAll(async () => {
  s3 = await startLocalS3({ bucket: "cli" });
  work = await mkdtemp(join(tmpdir(), "edgetune-cli-"));
});
afterAll(async () => {
  await s3?.stop();
  await rm(work, { recursive: true, force: true });
});

/** The file name of one image of `label` in a dataset. */
async function firstImage(dataset: string, label: string): Promise<string> {
  for await (const o of s3.store.list(`datasets/${dataset}/${label}/`)) return o.key.split("/").pop() as string;
  throw new Error(`no image of ${label}`);
}

/** What the edge writes for one capture of the served `pets` (a dataset image as its image), predicted as `label`. */
async function putCapture(suffix: string, label: string) {
  const { version } = (await readPointer(s3.store, "pets")) as { version: string };
  const day = new Date().toISOString().slice(0, 10);
  const id = `${day.replaceAll("-", "")}T101500-${suffix}`;
  // As the edge stores it: a PNG of IHDR, IDAT and IEND only.
  const original = (await s3.store.get(`datasets/pets/food/${await firstImage("pets", "food")}`)) as Uint8Array;
  const image = barePng(new Uint8Array(await sharp(original).png().toBuffer()));
  const imageKey = `captures/pets/images/${day}/${id}.png`;
  await s3.store.put(imageKey, image);
  const record = {
    schemaVersion: 1,
    id,
    model: "pets",
    version,
    capturedAt: new Date().toISOString(),
    reason: "low_confidence",
    predictions: [{ label, score: 0.41 }],
    image: { key: imageKey, contentType: "image/png", bytes: image.length, width: 96, height: 96, resized: false },
  };
  await s3.store.put(`captures/pets/images/${day}/${id}.json`, JSON.stringify(record));
  return { id, version, day };
}

async function edgetune(args: string[], script = "jobs/train/cli.ts", env: Record<string, string> = {}) {
  try {
    const { stdout, stderr } = await run(process.execPath, [script, ...args], { env: jobEnvironment(s3.config, env), timeout: 120_000 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const { code, stdout, stderr } = e as { code: number; stdout: string; stderr: string };
    return { code, stdout, stderr };
  }
}

describe("edgetune, for a person", () => {
  it("explains a bad --config file in one line: missing, not JSON, unknown or misplaced keys", async () => {
    const missing = await edgetune(["train", "--dataset", "x", "--config", join(work, "nope.json")]);
    expect([missing.code, missing.stderr.trim()]).toEqual([1, `edgetune: Config file ${join(work, "nope.json")} cannot be read (does it exist?).`]);
    await writeFile(join(work, "broken.json"), "{ epochs: 5 ");
    expect((await edgetune(["train", "--dataset", "x", "--config", join(work, "broken.json")])).stderr).toMatch(/is not valid JSON \(/);
    await writeFile(join(work, "flat.json"), JSON.stringify({ epochs: 5, colour: "red", head: { epoch: 3 } }));
    const flat = await edgetune(["train", "--dataset", "x", "--config", join(work, "flat.json")]);
    expect(flat.stderr).toMatch(/unknown options epochs \(did you mean head\.epochs\?\), colour, head\.epoch\. Options: dataset, model, base/);
    for (const r of [missing, flat]) expect(r.stderr).not.toMatch(/Internal error/);
  });

  it("says what is wrong in the user's words: the option, the variable, the value, never a schema path", async () => {
    const cases: [string[], Record<string, string>, string][] = [
      [["review", "pets", "--as", "faces"], {}, "edgetune: --as goes with --accept: edgetune review <model> --accept <ids> --as <label>."],
      [
        ["push", work, "--dataset", "Bad Name"],
        {},
        `edgetune: dataset name "Bad Name" must be 1–63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit`,
      ],
      [["models"], { EDGETUNE_BUCKET: "" }, "edgetune: No S3 bucket is set: set EDGETUNE_BUCKET (or pass --bucket <name> to edgetune)."],
      [
        ["train", "--dataset", "s3://b/x"],
        {},
        'edgetune: Invalid --dataset "s3://b/x". Valid values: a name, s3://<bucket>/datasets/<name>/, datasets/<name>/manifest.json.',
      ],
    ];
    for (const [args, env, message] of cases) {
      const r = await edgetune(args, "jobs/train/cli.ts", env);
      expect([args.join(" "), r.code, r.stderr.trim()]).toEqual([args.join(" "), 1, message]);
    }
  });

  it("shows the defaults a run really gets", async () => {
    const help = (await edgetune(["train", "--help"])).stdout.replace(/\s+/g, " ");
    expect(help).toContain(`(default ${DEFAULT_OPTIONS.head.epochs})`);
    expect(help).toContain(`input size (default ${DEFAULT_OPTIONS.imageSize}, or the manifest's imageSize)`);
    expect(help).toContain(`(default ${DEFAULT_OPTIONS.base})`);
  });

  it("names the models there are when asked about one that is not", async () => {
    await uploadSample(s3.store, "pets", { perLabel: 8 });
    await train(s3.store, { dataset: "pets", imageSize: 96, views: 1, head: { epochs: 3 }, promote: "always" }, memoryLogger());
    for (const args of [
      ["models", "cats"],
      ["current", "cats"],
      ["rollback", "cats"],
    ]) {
      const r = await edgetune(args);
      expect([args.join(" "), r.code]).toEqual([args.join(" "), 1]);
      expect(r.stderr).toMatch(/^edgetune: Model cats (does not exist|has no promoted version to roll back from)\. Models: pets\.\n$/);
    }
  });

  it("turns capture on, lists the review queue, applies a decision and shows the traffic (capture, review, monitor)", async () => {
    expect((await edgetune(["capture", "pets"])).stdout).toContain("Capture of pets is off. Turn it on: edgetune capture pets --on.");
    const on = await edgetune(["capture", "pets", "--on", "--below", "0.7", "--sample", "5%"]);
    expect([on.code, on.stdout.trim()]).toEqual([
      0,
      "Capture of pets is on: inputs scored below 0.7 (a set number; --below unsure follows the answers' own thresholds) and 5.0 % of the others, at most 500 a day (200 MB), kept 512 px at most. Review: edgetune review pets.",
    ]);
    // Back to the answer's own notion: the number is gone from the settings.
    const unsure = await edgetune(["capture", "pets", "--below", "unsure"]);
    expect(unsure.stdout).toContain(
      "Capture of pets is on: inputs the served version answers unsure (below their label's threshold; under 0.5 for a version trained before thresholds) and 5.0 % of the others",
    );
    expect(JSON.parse((await edgetune(["capture", "pets", "--json"])).stdout).belowConfidence).toBeUndefined();
    await edgetune(["capture", "pets", "--below", "70%"]);
    expect(JSON.parse((await edgetune(["capture", "pets", "--json"])).stdout)).toMatchObject({
      model: "pets",
      enabled: true,
      belowConfidence: 0.7,
      sampleRate: 0.05,
    });
    const bad = await edgetune(["capture", "pets", "--below", "2"]);
    expect([bad.code, bad.stderr.trim()]).toEqual([
      1,
      `edgetune: Invalid --below "2". Valid values: unsure (the served version's per-label thresholds), a number from 0 to 1, a percentage such as 5%.`,
    ]);
    // Nothing to list: said on stderr, so stdout stays empty for scripts.
    expect((await edgetune(["review", "pets"])).stderr).toContain("Nothing of pets is waiting for review.");
    expect((await edgetune(["monitor", "pets"])).stderr).toContain("No traffic of pets counted in the last 7 days");
    // What the edge writes: a capture and a counter delta.
    const { id, version, day } = await putCapture("cli00001", "travel");
    const counters = {
      schemaVersion: 1,
      model: "pets",
      version,
      from: `${day}T00:00:00.000Z`,
      to: `${day}T00:01:00.000Z`,
      requests: 40,
      labels: { travel: 40 },
    };
    const rest = { confidence: [0, 0, 0, 0, 40, 0, 0, 0, 0, 0], lowConfidence: 40, captured: 1, overCap: 0, failed: 0, optedOut: 0 };
    await s3.store.put(`captures/pets/counters/${day}/x.json`, JSON.stringify({ ...counters, ...rest }));
    const queue = await edgetune(["review", "pets"]);
    expect(queue.stdout).toMatch(new RegExp(`${id} .* ${version} +travel +41\\.0 % +unsure`));
    const applied = await edgetune(["review", "pets", "--accept", id, "--unseen", "--as", "food"]);
    // The command it suggests runs as printed: the dataset named, no placeholder.
    expect([applied.code, applied.stdout]).toEqual([
      0,
      expect.stringContaining("1 added to the dataset, 0 discarded. The next nightly run trains on the added images (or now: edgetune train --dataset pets)."),
    ]);
    expect(await s3.store.head(`datasets/pets/food/captured-${id}.png`)).not.toBeNull();
    const watched = await edgetune(["monitor", "pets"]);
    // Which drift is named first depends on the tiny model's held-out confidence (the rules are unit-tested in shared/monitor).
    expect(watched.stdout).toMatch(new RegExp(`${day} +40 +100\\.0 % +travel 100% +1 +(low-confidence answers 100\\.0 %|label shift: \\w+ is [\\d.]+ %)`));
    // The held-out reference as the whole count it is, from the version's per-image scores (not a histogram).
    expect(watched.stdout).toMatch(new RegExp(`Held-out split of ${version} \\((\\d+) images\\): \\d+ of \\1 answers under 0\\.7; predicted `));
  });

  it("prints text from captures/ (edge-writable) made safe, and takes a stored label only if the dataset has it", async () => {
    // A label that would clear the screen and retitle the terminal, in a capture record and a counter delta.
    const hostile = "\u001b]0;owned\u0007\u001b[2Jfood\u009b";
    const { id, version, day } = await putCapture("cli00002", hostile);
    const counters = { schemaVersion: 1, model: "pets", version, from: `${day}T00:02:00.000Z`, to: `${day}T00:03:00.000Z`, requests: 5 };
    const rest = { labels: { [hostile]: 5 }, confidence: [0, 0, 0, 0, 5, 0, 0, 0, 0, 0], lowConfidence: 5, captured: 1, overCap: 0, failed: 0, optedOut: 0 };
    await s3.store.put(`captures/pets/counters/${day}/y.json`, JSON.stringify({ ...counters, ...rest }));
    const shown = [await edgetune(["review", "pets"]), await edgetune(["monitor", "pets"]), await edgetune(["review", "pets", "--accept", id, "--unseen"])];
    const raw = ["\u001b", "\u0007", "\u009b"];
    for (const r of shown) expect(raw.filter((c) => `${r.stdout}${r.stderr}`.includes(c))).toEqual([]);
    expect(shown[0]?.stdout).toContain("\\x1b]0;owned\\x07\\x1b[2Jfood\\x9b");
    // Without --as, the stored label is taken only if it is one of the dataset's: this one is not.
    expect(shown[2]?.code).toBe(1);
    expect(shown[2]?.stderr).toContain(`not added: ${id}: its predicted label "\\x1b]0;owned\\x07\\x1b[2Jfood\\x9b" is not a label of dataset pets`);
    expect(await s3.store.head(`datasets/pets/food/captured-${id}.png`)).toBeNull();
  });

  it("rolls back one served version at a time, not back and forth; --to picks any version", async () => {
    const versions: string[] = [];
    for (const seed of [1, 2, 3]) {
      const r = await train(s3.store, { dataset: "pets", imageSize: 96, views: 1, seed, head: { epochs: 3 }, promote: "always" }, memoryLogger());
      versions.push(r.version);
    }
    const [v1, v2, v3] = versions;
    expect((await readPointer(s3.store, "pets"))?.version).toBe(v3);
    await edgetune(["rollback", "pets"]);
    expect((await readPointer(s3.store, "pets"))?.version).toBe(v2);
    await edgetune(["rollback", "pets"]);
    expect((await readPointer(s3.store, "pets"))?.version).toBe(v1);
    await edgetune(["rollback", "pets", "--to", v3 as string]);
    expect((await readPointer(s3.store, "pets"))?.version).toBe(v3);
    const back = await edgetune(["rollback", "pets"]);
    expect((await readPointer(s3.store, "pets"))?.version).toBe(v1); // v3 replaced v1, so back to v1
    expect(back.stdout).toBe(`pets now serves ${v1} (was ${v3}); the edge picks it up within 30 seconds (the worker's POINTER_TTL_SECONDS).\n`);
    // --to the version already served changes nothing: it does not record itself as its own "previous".
    const same = await edgetune(["rollback", "pets", "--to", v1 as string]);
    expect([same.code, same.stdout]).toEqual([0, `pets already serves ${v1}; nothing changed.\n`]);
    expect(await readPointer(s3.store, "pets")).toMatchObject({ version: v1, previous: v3 });

    // For people: sentences and aligned tables; for scripts: --json on every command, one object a line.
    const current = await edgetune(["current", "pets"]);
    expect(current.stdout).toMatch(
      new RegExp(
        `^pets serves ${v1} since \\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d:\\d\\d UTC \\(rollback from ${v3}\\)(; edgetune rollback pets would serve v[0-9a-f]{12})?\\n$`,
      ),
    );
    expect(JSON.parse((await edgetune(["current", "pets", "--json"])).stdout)).toMatchObject({ version: v1, previous: v3 });
    const table = (await edgetune(["models", "pets"])).stdout.split("\n");
    expect(table[0]).toMatch(/^\s+VERSION\s+TRAINED\s+ACCURACY\s+HELD-OUT\s+STRATEGY\s+BASE\s+IMAGES$/);
    const served = table.filter((l) => l.startsWith("*"));
    expect(served).toHaveLength(1);
    expect(served[0]).toContain(v1);
    // Columns line up: every row's version starts where the header's does.
    const col = (table[0] as string).indexOf("VERSION");
    for (const row of table.slice(1).filter(Boolean)) expect(row.slice(col, col + 1)).toBe("v");
    const json = (await edgetune(["models", "pets", "--json"])).stdout
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { version: string; current: boolean });
    expect(json.map((v) => v.version).sort()).toEqual([...versions, ...json.map((v) => v.version).filter((v) => !versions.includes(v))].sort());
    expect(json.filter((v) => v.current).map((v) => v.version)).toEqual([v1]);
    expect((await edgetune(["models"])).stdout).toMatch(new RegExp(`^MODEL\\s+SERVED\\s+PROMOTED\\s+VERSIONS\npets\\s+${v1}\\s`));
    expect(JSON.parse((await edgetune(["models", "--json"])).stdout)).toMatchObject({ name: "pets", current: v1 });
    expect(JSON.parse((await edgetune(["datasets", "--json"])).stdout)).toMatchObject({ name: "pets", complete: true });
    expect(JSON.parse((await edgetune(["base", "list", "--json"])).stdout.split("\n")[0] as string)).toHaveProperty("id");
  }, 180_000);

  it("saves a version's report and says where it is; classifies images through the edge worker", async () => {
    const out = join(work, "report.html");
    const saved = await edgetune(["report", "pets", "--out", out]);
    expect(saved.code).toBe(0);
    expect(saved.stderr).toMatch(/Report of pets v[0-9a-f]{12} \(s3:\/\/cli\/models\/pets\/v[0-9a-f]{12}\/report\.html\) saved to/);
    expect(await readFile(out, "utf8")).toContain("<svg");
    const reportJson = (await edgetune(["report", "pets", "--json"])).stdout;
    expect(reportJson.split("\n")).toHaveLength(2); // one object, one line (and its newline)
    expect(JSON.parse(reportJson)).toMatchObject({ name: "pets" });
    expect((await edgetune(["report", "pets", "v000000000000"])).stderr).toMatch(/Model pets has no version v000000000000\. Versions: v/);

    const edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket });
    try {
      const [image] = await uploadSample(s3.store, "scratch", { perLabel: 1 });
      const file = join(work, "picture.png");
      await writeFile(file, (image as { bytes: Uint8Array }).bytes);
      const r = await edgetune(["classify", "pets", file, "--top", "2"], "jobs/train/cli.ts", { EDGETUNE_EDGE_URL: edge.url, EDGETUNE_API_KEY: edge.apiKey });
      expect(r.code).toBe(0);
      // The answer first (a label with its threshold, or unsure), then the scores.
      expect(r.stdout).toMatch(
        /picture\.png: (\w+ \([\d.]+ %, threshold [\d.]+ %\)|unsure: the best label, \w+ [\d.]+ %, is below its threshold [\d.]+ %); \w+ [\d.]+ %, \w+ [\d.]+ %\n$/,
      );
      const lenient = await edgetune(["classify", "pets", file, "--threshold", "0"], "jobs/train/cli.ts", {
        EDGETUNE_EDGE_URL: edge.url,
        EDGETUNE_API_KEY: edge.apiKey,
      });
      expect(lenient.stdout).toMatch(/picture\.png: \w+ \([\d.]+ %\); /);
      const refused = await edgetune(["classify", "pets", file], "jobs/train/cli.ts", { EDGETUNE_EDGE_URL: edge.url, EDGETUNE_API_KEY: "wrong" });
      expect([refused.code, refused.stdout]).toEqual([1, `${file}: HTTP 401: The API key is not valid.\n`]);
    } finally {
      await edge.stop();
    }
  });

  it("push checks the folder with the job's rules before uploading anything; --dry-run only checks", async () => {
    const folder = async (name: string, files: Record<string, Uint8Array>) => {
      const dir = join(work, name);
      for (const [file, bytes] of Object.entries(files)) {
        await mkdir(dirname(join(dir, file)), { recursive: true });
        await writeFile(join(dir, file), bytes);
      }
      await mkdir(dir, { recursive: true });
      return dir;
    };
    const images = await uploadSample(s3.store, "scratch2", { perLabel: 6 });
    const byLabel = (labels: string[]) => Object.fromEntries(images.filter((i) => labels.includes(i.label)).map((i) => [i.file, i.bytes]));
    const uploadedTo = async (dataset: string) => {
      const found: string[] = [];
      for await (const o of s3.store.list(`datasets/${dataset}/`)) found.push(o.key);
      return found;
    };
    const cases: [string, Record<string, Uint8Array>, RegExp][] = [
      ["one-label", byLabel(["food"]), /has 1 label \(food\); a classifier needs at least 2 label folders/],
      ["flat", Object.fromEntries(images.slice(0, 3).map((i, n) => [`${n}.png`, i.bytes])), /has no images to push .*Put them in one sub-folder per label/],
      [
        "empty",
        {},
        new RegExp(
          `^edgetune: ${join(work, "empty")} has no images to push \\(\\.jpg, .*\\)\\. Put them in one sub-folder per label: ${join(work, "empty", "<label>", "<image>.jpg")}\n$`,
        ),
      ],
    ];
    for (const [name, files, message] of cases) {
      const r = await edgetune(["push", await folder(name, files), "--dataset", name]);
      expect([name, r.code]).toEqual([name, 1]);
      expect(r.stderr).toMatch(message);
      expect(await uploadedTo(name)).toEqual([]);
    }
    const ok = await folder("ok", { ...byLabel(["food", "travel"]), "travel/broken.png": new Uint8Array([137, 80, 78, 71, 1, 2]) });
    const dry = await edgetune(["push", ok, "--dataset", "ok", "--dry-run"]);
    expect(dry.code).toBe(0);
    // The undecodable file is not counted in travel (the job skips it) and is named.
    expect(dry.stdout).toBe("ok: food 6, travel 6 — ready to push (nothing was uploaded).\n");
    expect(dry.stderr).toContain("warning: 1 file(s) cannot be decoded and are not counted; the job skips such files: travel/broken.png (");
    const dryJson = await edgetune(["push", ok, "--dataset", "ok", "--dry-run", "--json"]);
    expect(JSON.parse(dryJson.stdout)).toMatchObject({ dataset: "ok", labels: { food: 6, travel: 6 } });
    expect(await uploadedTo("ok")).toEqual([]);
  });

  it("npm start says at once that a port it was given is busy, before any training", async () => {
    const busy: Server = createServer();
    await new Promise<void>((resolve) => busy.listen(0, "127.0.0.1", resolve));
    const port = String((busy.address() as { port: number }).port);
    try {
      const r = await edgetune([], "infra/local/start.ts", { EDGETUNE_EDGE_PORT: port });
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(`edgetune start: Port ${port} (EDGETUNE_EDGE_PORT) is in use: stop what uses it, or set EDGETUNE_EDGE_PORT to another port`);
      expect(r.stdout).not.toMatch(/training job started/);
    } finally {
      busy.close();
    }
  });

  it("npm start prints a command line the CLI runs as pasted (classify included) and says when the nightly stand-in runs", async () => {
    const env: NodeJS.ProcessEnv = { ...process.env };
    for (const k of Object.keys(env)) if (k.startsWith("EDGETUNE_") || k.startsWith("AWS_")) delete env[k];
    const child = spawn(process.execPath, ["infra/local/start.ts"], { env, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    child.stdout.on("data", (d: Buffer) => {
      out += d.toString();
    });
    const exited = new Promise<number | null>((resolve) => child.on("exit", resolve));
    try {
      await expect.poll(() => out, { timeout: 170_000, interval: 500 }).toContain("Serving until Ctrl-C.");
      expect(out).toContain("The nightly stand-in runs every 2 minute(s) (EDGETUNE_NIGHTLY_MINUTES; 0 turns it off)");
      const exported = /^ {2}export (.+)$/m.exec(out)?.[1] ?? "";
      const pasted = Object.fromEntries(exported.split(" ").map((kv) => kv.split("=", 2) as [string, string]));
      expect(Object.keys(pasted).sort()).toEqual(
        ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "EDGETUNE_API_KEY", "EDGETUNE_BUCKET", "EDGETUNE_EDGE_URL", "EDGETUNE_S3_ENDPOINT"].sort(),
      );
      const classify = /^ {2}npx edgetune (classify .+)$/m.exec(out)?.[1]?.split(" ") ?? [];
      const r = await run(process.execPath, ["jobs/train/cli.ts", ...classify], { env: { ...env, ...pasted }, timeout: 60_000 });
      // An answer in words (a label, unsure or none of these), then the scores.
      expect(r.stdout).toMatch(/\.png: (\w+ \(|unsure: |none of these).*\w+ [\d.]+ %/);
    } finally {
      child.kill("SIGTERM");
      await exited;
    }
  }, 240_000);
});
