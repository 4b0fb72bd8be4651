import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import * as tf from "@tensorflow/tfjs";
import onnxProto from "onnx-proto";
import * as ortNode from "onnxruntime-node";
import * as ortWeb from "onnxruntime-web";
import { chromium } from "playwright-core";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPointer } from "#shared/artifacts.ts";
import { ARTIFACT_FILES } from "#shared/contracts/artifact.ts";
import { sha256Hex } from "#shared/hash.ts";
import { POOL_LAYER, similarity, versionClassMeans } from "#shared/novelty.ts";
import { type Pixels, preprocess } from "#shared/preprocess.ts";
import { startEdgeWorker } from "../../../../infra/local/edge-worker.ts";
import { jobEnvironment } from "../../../../infra/local/job-env.ts";
import { type LocalS3, startLocalS3 } from "../../../../infra/local/s3-server.ts";
import { uploadSample } from "../../../../test/support/datasets.ts";
import { postClassify } from "../../../../test/support/edge.ts";
import { decodeImage } from "../dataset/decode.ts";
import { memoryLogger } from "../log.ts";
import { initBackend } from "../model/backend.ts";
import { loadModel, modelToFiles, WEIGHTS_FILE } from "../model/io.ts";
import { train } from "../train.ts";
import { ExportUnsupportedError, exportModel, onnxOf, readVersion, type VersionFiles } from "./export.ts";
import { modelInput } from "./input.ts";
import { ONNX_INPUT, ONNX_SIMILARITY } from "./onnx.ts";
import { checkParity, type ExportedClassifier, ortClassifier, type ParityImage } from "./parity.ts";

/**
 * `edgetune export` of a model trained with the defaults (the tests' default base, 160 px) on the sample
 * dataset: the ONNX file against the edge's own computation (shared/preprocess.ts + the served tfjs
 * model) on every image, in onnxruntime-node and onnxruntime-web's wasm build.
 */
const MODEL = "emoji";
let s3: LocalS3;
let dir: string;
let version: VersionFiles;
let onnxBytes: Uint8Array;
let images: ParityImage[];
/** The image files (sample and variants) behind `images`. */
let sources: { file: string; bytes: Uint8Array }[];

beforeAll(async () => {
  await initBackend();
  s3 = await startLocalS3();
  dir = await mkdtemp(join(tmpdir(), "edgetune-export-"));
  const uploaded = await uploadSample(s3.store, MODEL, { perLabel: 8, size: 128 });
  await train(s3.store, { dataset: MODEL, views: 1, head: { epochs: 5 }, promote: "always" }, memoryLogger());
  sources = [...uploaded, ...(await variants(uploaded.slice(0, 6)))];
  images = await Promise.all(sources.map(async (i) => ({ name: i.file, pixels: await decodeImage(i.bytes) })));
  version = await readVersion(s3.store, MODEL);
  onnxBytes = await onnxOf(version);
});
afterAll(async () => {
  await s3?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/**
 * The sample images are square and opaque; these add what the crop and the alpha compositing act on:
 * wide frames (a coloured band each side) and PNGs with an alpha gradient.
 */
async function variants(sample: { file: string; bytes: Uint8Array }[]): Promise<{ file: string; bytes: Uint8Array }[]> {
  return Promise.all(
    sample.map(async (img, i) => {
      if (i % 2 === 0) {
        const wide = await sharp(img.bytes).extend({ left: 48, right: 48, background: "#3080c0" }).png().toBuffer();
        return { file: `wide-${img.file}.png`, bytes: new Uint8Array(wide) };
      }
      const { data, info } = await sharp(img.bytes).ensureAlpha().raw().toBuffer({ resolveWithObject: true });
      for (let p = 0; p < info.width * info.height; p++) data[p * 4 + 3] = (p % info.width) * 2;
      const png = await sharp(data, { raw: { width: info.width, height: info.height, channels: 4 } })
        .png()
        .toBuffer();
      return { file: `alpha-${img.file}.png`, bytes: new Uint8Array(png) };
    }),
  );
}

const size = () => version.metadata.input.size;
const served = () => loadModel(version.files.get(ARTIFACT_FILES.model) as Uint8Array, version.files);
const nodeSession = (bytes = onnxBytes) => ortNode.InferenceSession.create(bytes);

describe("edgetune export --format onnx", () => {
  it("the CLI writes one ONNX file within the goals: ≤ 5 s, ≤ 2.2 × the edge's float16 files", async () => {
    const out = join(dir, "cli.onnx");
    const started = performance.now();
    const { stdout } = await promisify(execFile)(process.execPath, ["jobs/train/cli.ts", "export", MODEL, "--out", out, "--json"], {
      env: jobEnvironment(s3.config),
    });
    const wall = performance.now() - started;
    const r = JSON.parse(stdout) as { path: string; bytes: number; ms: number; opset: number; labels: string[] };
    const edgeBytes = version.metadata.files.filter((f) => version.files.has(f.path)).reduce((n, f) => n + f.bytes, 0);
    console.info(
      `export: ${r.ms.toFixed(0)} ms in the CLI (${wall.toFixed(0)} ms with Node's start), ${r.bytes} bytes = ${(r.bytes / edgeBytes).toFixed(2)} × the edge's ${edgeBytes}`,
    );
    expect(r).toMatchObject({ path: out, opset: 13, labels: version.metadata.labels });
    expect(r.ms).toBeLessThanOrEqual(5000);
    expect(r.bytes).toBeLessThanOrEqual(edgeBytes * 2.2);
    // The same bytes as the in-process export (the conversion is deterministic).
    expect((await readFile(out)).equals(onnxBytes)).toBe(true);
  });

  it("states labels, input, preprocessing and opset in the model's metadata", () => {
    const m = onnxProto.onnx.ModelProto.decode(onnxBytes);
    const props = Object.fromEntries(m.metadataProps.map((p) => [p.key, p.value]));
    expect(JSON.parse(props.labels as string)).toEqual(version.metadata.labels);
    expect(JSON.parse(props.input as string)).toMatchObject({ dtype: "uint8", layout: "NHWC", shape: ["N", size(), size(), 3], channels: "RGB" });
    expect(JSON.parse(props.preprocessing as string)).toMatchObject(version.metadata.preprocessing);
    expect(props["preprocessing.caller"]).toMatch(/composite transparency.*centred square.*antialiased bilinear/);
    expect([props.opset, Number(m.opsetImport[0]?.version)]).toEqual(["13", 13]);
    expect(m.graph?.input?.[0]?.type?.tensorType?.elemType).toBe(onnxProto.onnx.TensorProto.DataType.UINT8);
  });

  it("onnxruntime-node answers like the edge's computation on every image: same top-1, probabilities within 1e-3", async () => {
    const model = await served();
    const session = await nodeSession();
    const parity = await checkParity(ortClassifier(ortNode, session, size()), model, version.metadata, images, (p) =>
      modelInput(p, size(), version.metadata.preprocessing),
    );
    console.info(`parity (onnxruntime-node vs tfjs) on ${parity.images} images: max |Δp| ${parity.maxDelta.toExponential(2)}`);
    expect(parity).toMatchObject({ ok: true, top1Differs: [], images: images.length });
    await session.release();
    model.dispose();
  });

  it("a version with a novelty floor exports its similarity as a second output: the edge's number within 1e-3, the floor in metadata_props", async () => {
    const n = version.metadata.novelty;
    if (!n) throw new Error("the trained version has no novelty floor");
    const props = Object.fromEntries(onnxProto.onnx.ModelProto.decode(onnxBytes).metadataProps.map((p) => [p.key, p.value]));
    expect(JSON.parse(props.novelty as string)).toMatchObject({ output: ONNX_SIMILARITY, floor: n.floor });
    const model = await served();
    const probe = tf.model({ inputs: model.inputs, outputs: model.getLayer(POOL_LAYER).output as tf.SymbolicTensor });
    const means = versionClassMeans(version.metadata, version.files) as Float32Array;
    const session = await nodeSession();
    let maxDelta = 0;
    for (const image of images) {
      const x = preprocess(image.pixels, size(), version.metadata.preprocessing);
      const features = tf.tidy(() => (probe.predict(tf.tensor4d(x, [1, size(), size(), 3])) as tf.Tensor).dataSync() as Float32Array);
      const input = modelInput(image.pixels, size(), version.metadata.preprocessing);
      const out = await session.run({ [ONNX_INPUT]: new ortNode.Tensor("uint8", input, [1, size(), size(), 3]) });
      const got = (out[ONNX_SIMILARITY] as { data: Float32Array }).data;
      expect(got).toHaveLength(1);
      maxDelta = Math.max(maxDelta, Math.abs((got[0] as number) - similarity(features, means)));
    }
    console.info(`similarity (onnxruntime-node vs the edge's computation) on ${images.length} images: max |Δ| ${maxDelta.toExponential(2)}`);
    expect(maxDelta).toBeLessThan(1e-3);
    await session.release();
    model.dispose();
  });

  it("fails the parity check when any preprocessing step drifts", async () => {
    const model = await served();
    const spec = version.metadata.preprocessing;
    const session = await nodeSession();
    const exported = ortClassifier(ortNode, session, size());
    // A few sample images and every variant (the crop acts only on the wide ones, compositing on the transparent ones).
    const some = images.filter((image, i) => i < 6 || /^(wide|alpha)-/.test(image.name));
    const check = (run: ExportedClassifier, input: (p: Pixels) => Uint8Array) => checkParity(run, model, version.metadata, some, input);
    const bgr = (p: Pixels) => {
      const x = modelInput(p, size(), spec);
      for (let i = 0; i < x.length; i += 3) [x[i], x[i + 2]] = [x[i + 2] as number, x[i] as number];
      return x;
    };
    // Nearest-neighbour sampling instead of the triangle filter (alpha composited as the edge does).
    const nearest = (p: Pixels) => {
      const x = new Uint8Array(size() * size() * 3);
      const side = Math.min(p.width, p.height);
      for (let y = 0; y < size(); y++)
        for (let xo = 0; xo < size(); xo++) {
          const sx = Math.floor((p.width - side) / 2 + ((xo + 0.5) * side) / size());
          const sy = Math.floor((p.height - side) / 2 + ((y + 0.5) * side) / size());
          const s = (sy * p.width + sx) * p.channels;
          const a = p.channels === 4 ? (p.data[s + 3] as number) / 255 : 1;
          for (let c = 0; c < 3; c++) x[(y * size() + xo) * 3 + c] = Math.round((p.data[s + c] as number) * a + 255 * (1 - a));
        }
      return x;
    };
    const noComposite = (p: Pixels) => modelInput(p, size(), { ...spec, version: 1 });
    for (const [what, input] of [
      ["channels BGR", bgr],
      ["nearest-neighbour resampling", nearest],
      ["stretched, not centre-cropped", (p: Pixels) => modelInput(p, size(), { ...spec, fit: "stretch" })],
      ["alpha not composited", noComposite],
    ] as const)
      expect((await check(exported, input)).ok, what).toBe(false);
    // The normalisation in the graph: its scale 1 % off.
    const drifted = onnxProto.onnx.ModelProto.decode(onnxBytes);
    const scale = drifted.graph?.initializer?.find((t) => t.name === "normalization/scale") as onnxProto.onnx.TensorProto;
    const value = new Float32Array(Uint8Array.from(scale.rawData).buffer);
    scale.rawData = new Uint8Array(Float32Array.of((value[0] as number) * 1.01).buffer);
    const driftedSession = await nodeSession(onnxProto.onnx.ModelProto.encode(drifted).finish());
    const parity = await check(ortClassifier(ortNode, driftedSession, size()), (p) => modelInput(p, size(), spec));
    expect(parity.ok).toBe(false);
    expect(parity.maxDelta).toBeGreaterThan(1e-3);
    await Promise.all([session.release(), driftedSession.release()]);
    model.dispose();
  });

  it("onnxruntime-web's wasm build (in Node) gives onnxruntime-node's answers", async () => {
    ortWeb.env.wasm.numThreads = 1;
    const [web, node] = await Promise.all([ortWeb.InferenceSession.create(onnxBytes, { executionProviders: ["wasm"] }), nodeSession()]);
    const runWeb = ortClassifier(ortWeb, web, size());
    const runNode = ortClassifier(ortNode, node, size());
    let worst = 0;
    for (const image of images) {
      const x = modelInput(image.pixels, size(), version.metadata.preprocessing);
      const [a, b] = [await runWeb(x), await runNode(x)];
      expect(a.indexOf(Math.max(...a)), image.name).toBe(b.indexOf(Math.max(...b)));
      a.forEach((v, i) => {
        worst = Math.max(worst, Math.abs(v - (b[i] as number)));
      });
    }
    console.info(`onnxruntime-web (wasm) vs onnxruntime-node: max |Δp| ${worst.toExponential(2)} on ${images.length} images`);
    expect(worst).toBeLessThanOrEqual(1e-5);
    await Promise.all([web.release(), node.release()]);
  });
});

describe("a model the converter does not cover", () => {
  it("is refused by name, pointing at the tfjs export", async () => {
    const input = tf.input({ shape: [8, 8, 3], name: "image" });
    const up = tf.layers.conv2dTranspose({ filters: 2, kernelSize: 3, name: "upsample" }).apply(input) as tf.SymbolicTensor;
    const out = tf.layers.dense({ units: 3, activation: "softmax" }).apply(tf.layers.globalAveragePooling2d({}).apply(up)) as tf.SymbolicTensor;
    const files = await modelToFiles(tf.model({ inputs: input, outputs: out }), "float32");
    const odd = {
      ...version,
      files: new Map([
        [ARTIFACT_FILES.model, files.modelJson],
        [WEIGHTS_FILE, files.weights],
      ]),
    };
    await expect(onnxOf(odd)).rejects.toThrow(ExportUnsupportedError);
    await expect(onnxOf(odd)).rejects.toThrow(/upsample \(Conv2DTranspose\)\. Export it with --format tfjs/);
  });
});

describe("against the edge worker itself (real workerd)", () => {
  it("the export's answers are the worker's: same top-1 for every image, probabilities within 1e-3", async () => {
    const edge = await startEdgeWorker({ s3Endpoint: s3.endpoint, bucket: s3.config.bucket });
    const session = await nodeSession();
    const exported = ortClassifier(ortNode, session, size());
    const { labels } = version.metadata;
    let worst = 0;
    try {
      for (const image of sources) {
        // The default top_k (5) covers every label of the sample (3).
        const res = await postClassify(edge, MODEL, image);
        expect(res.status, image.file).toBe(200);
        const answer = (await res.json()) as { version: string; predictions: { label: string; score: number }[] };
        expect([answer.version, answer.predictions.length]).toEqual([version.metadata.version, labels.length]);
        const p = await exported(modelInput(await decodeImage(image.bytes), size(), version.metadata.preprocessing));
        expect(labels[p.indexOf(Math.max(...p))], image.file).toBe(answer.predictions[0]?.label);
        for (const { label, score } of answer.predictions) worst = Math.max(worst, Math.abs(score - (p[labels.indexOf(label)] as number)));
      }
    } finally {
      await session.release();
      await edge.stop();
    }
    console.info(`export vs the worker in workerd on ${sources.length} images: max |Δp| ${worst.toExponential(2)}`);
    expect(worst).toBeLessThanOrEqual(1e-3);
  });
});

const readme = () => readFile(join(import.meta.dirname, "../../../../README.md"), "utf8");
/** The README's code block after `<!-- snippet: name -->`. */
function snippet(text: string, name: string): string {
  const block = new RegExp(`<!-- snippet: ${name} -->\\s*\`\`\`js\\n([\\s\\S]*?)\`\`\``).exec(text)?.[1];
  if (!block) throw new Error(`README has no snippet ${name}`);
  return block;
}

describe("README's Export section", () => {
  type ToModelInput = (data: Uint8Array, width: number, height: number, channels: number, size: number) => Uint8Array;

  it("its toModelInput is the edge's preprocessing, byte for byte", async () => {
    const toModelInput = new Function(`${snippet(await readme(), "model-input")}\nreturn toModelInput;`)() as ToModelInput;
    for (const { name, pixels } of images)
      expect(
        Buffer.from(toModelInput(pixels.data as Uint8Array, pixels.width, pixels.height, pixels.channels, size())).equals(
          Buffer.from(modelInput(pixels, size(), version.metadata.preprocessing)),
        ),
        name,
      ).toBe(true);
  });

  it("its Node snippet, run as a user runs it, answers like the edge", async () => {
    const text = await readme();
    // Beside the project's node_modules, so its imports resolve as in a user's project.
    const work = await mkdtemp(join(import.meta.dirname, "../../../../node_modules/.edgetune-readme-"));
    try {
      const program = join(work, "classify.mjs");
      // Imports first (ES modules need them at the top), then the function, then the rest.
      const node = snippet(text, "node");
      const imports = node.split("\n").filter((l) => l.startsWith("import "));
      const rest = node.split("\n").filter((l) => !l.startsWith("import "));
      await writeFile(program, [...imports, snippet(text, "model-input"), ...rest].join("\n"));
      const modelFile = join(work, "model.onnx");
      await writeFile(modelFile, onnxBytes);
      const model = await served();
      for (const image of sources.filter((_, i) => i % 5 === 0)) {
        const imageFile = join(work, image.file.replaceAll("/", "_"));
        await writeFile(imageFile, image.bytes);
        const { stdout } = await promisify(execFile)(process.execPath, [program, modelFile, imageFile]);
        const ranked = JSON.parse(stdout) as { label: string; score: number }[];
        const x = preprocess(await decodeImage(image.bytes), size(), version.metadata.preprocessing);
        const edge = tf.tidy(() => (model.predict(tf.tensor4d(x, [1, size(), size(), 3])) as tf.Tensor).dataSync());
        const { labels } = version.metadata;
        expect(ranked[0]?.label, image.file).toBe(labels[edge.indexOf(Math.max(...edge))]);
        for (const { label, score } of ranked)
          expect(Math.abs(score - (edge[labels.indexOf(label)] as number)), `${image.file} ${label}`).toBeLessThanOrEqual(1e-3);
      }
      model.dispose();
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  });
});

const CHROMIUM = process.env.EDGETUNE_CHROMIUM ?? "/usr/bin/chromium";

describe.skipIf(!existsSync(CHROMIUM))("README's browser snippet (headless Chromium, onnxruntime-web from npm)", () => {
  it("answers like the edge on opaque images: same top-1, probabilities within 1e-3", async () => {
    const text = await readme();
    const code = (name: string) => snippet(text, name);
    const ortDist = join(import.meta.dirname, "../../../../node_modules/onnxruntime-web/dist");
    // One sample image per label and a wide one (a page per image loads onnxruntime-web afresh: seconds each).
    const opaque = [
      ...sources.filter((i) => !/^(wide|alpha)-/.test(i.file)).filter((_, i) => i % 8 === 0),
      ...sources.filter((i) => i.file.startsWith("wide-")).slice(0, 1),
    ];
    let current = opaque[0] as (typeof opaque)[number];
    // The snippet as written; what it leaves to the page (the file, SIZE, LABELS) is defined before it.
    const page = (labels: string[]) => `<!doctype html><script type="importmap">{"imports":{"onnxruntime-web":"/ort/ort.bundle.min.mjs"}}</script>
<script type="module">
const file = await (await fetch("/image")).blob();
const SIZE = ${size()};
const LABELS = ${JSON.stringify(labels)};
${code("model-input")}
${code("browser")}
window.result = Array.from(probabilities.data);
</script>`;
    const server = createServer(async (req, res) => {
      const url = req.url ?? "/";
      const type = url.endsWith(".mjs")
        ? "text/javascript"
        : url.endsWith(".wasm")
          ? "application/wasm"
          : url === "/"
            ? "text/html"
            : "application/octet-stream";
      const body =
        url === "/"
          ? page(version.metadata.labels)
          : url === "/image"
            ? current.bytes
            : url.endsWith(".onnx")
              ? onnxBytes
              : url.startsWith("/ort/")
                ? await readFile(join(ortDist, url.slice(5))).catch(() => null)
                : null;
      res.writeHead(body ? 200 : 404, { "content-type": type }).end(body);
    });
    await new Promise<void>((ok) => server.listen(0, "127.0.0.1", ok));
    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
    });
    const model = await served();
    try {
      const { labels } = version.metadata;
      const origin = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
      let worst = 0;
      for (const image of opaque) {
        current = image;
        const tab = await browser.newPage();
        const errors: string[] = [];
        tab.on("pageerror", (e) => errors.push(e.message));
        await tab.goto(`${origin}/`);
        const got = (await (
          await tab.waitForFunction(() => (window as unknown as { result?: number[] }).result, undefined, { timeout: 30_000 })
        ).jsonValue()) as number[];
        expect(errors).toEqual([]);
        await tab.close();
        const x = preprocess(await decodeImage(image.bytes), size(), version.metadata.preprocessing);
        const edge = Array.from(tf.tidy(() => (model.predict(tf.tensor4d(x, [1, size(), size(), 3])) as tf.Tensor).dataSync()));
        expect(labels[got.indexOf(Math.max(...got))], image.file).toBe(labels[edge.indexOf(Math.max(...edge))]);
        got.forEach((v, i) => {
          worst = Math.max(worst, Math.abs(v - (edge[i] as number)));
        });
      }
      console.info(`README browser snippet in Chromium vs the edge's computation on ${opaque.length} images: max |Δp| ${worst.toExponential(2)}`);
      expect(worst).toBeLessThanOrEqual(1e-3);
    } finally {
      model.dispose();
      await browser.close();
      server.close();
    }
  });
});

describe("edgetune export --format tfjs", () => {
  it("writes the served files and metadata.json as one folder that tfjs loads", async () => {
    const out = join(dir, "tfjs");
    const r = await exportModel(s3.store, MODEL, { format: "tfjs", out });
    expect((await readdir(out)).sort()).toEqual([...version.files.keys(), ARTIFACT_FILES.metadata].sort());
    // metadata.json exactly as stored (the served one's sha256 is the pointer's).
    const pointer = await readPointer(s3.store, MODEL);
    expect(await sha256Hex(await readFile(join(out, ARTIFACT_FILES.metadata)))).toBe(pointer?.metadataSha256);
    expect(r.version).toBe(pointer?.version);
    const files = new Map(await Promise.all([...version.files.keys()].map(async (f) => [f, new Uint8Array(await readFile(join(out, f)))] as const)));
    const model = await loadModel(files.get(ARTIFACT_FILES.model) as Uint8Array, files);
    expect(model.outputs[0]?.shape).toEqual([null, version.metadata.labels.length]);
    model.dispose();
  });
});
