#!/usr/bin/env node
/**
 * `npm run bench:export-resize` — can the exported ONNX model resize images itself and still answer
 * like the edge? Compares shared/preprocess.ts's resampling (antialiased triangle filter, rounded half
 * up to 8 bits) with ONNX's Resize (opset 18: linear, antialias=1, half_pixel, then Round and Clip)
 * run by onnxruntime-node, and with sharp's `resize(kernel: "linear")` (the README's Node snippet), on
 * the same square-cropped pixels (the crop is taken out of the comparison: the edge's crop starts at a
 * half pixel when the sides differ by an odd number, which ONNX's Slice cannot do). Images: the
 * bundled Twemoji sample, and ../shared/data/hymenoptera_data/val photos where they are.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import onnxProto from "onnx-proto";
import * as ort from "onnxruntime-node";
import sharp from "sharp";
import { type Pixels, preprocess } from "#shared/preprocess.ts";
import { decodeImage } from "../jobs/train/src/dataset/decode.ts";
import { sampleDataset } from "../jobs/train/src/dataset/sample.ts";
import { arg, hasShared, machine, SHARED } from "./common.ts";

const proto = onnxProto.onnx;
const sizes = (arg("sizes", "160,224") as string).split(",").map(Number);
const limit = Number(arg("photos", "40"));

/** uint8 NHWC [1, H, W, 3] → ONNX Resize to [1, S, S, 3] → rounded uint8. */
function resizeGraph(size: number): Uint8Array {
  const f = proto.TensorProto.DataType;
  const node = (opType: string, input: string[], output: string, attribute: onnxProto.onnx.IAttributeProto[] = []) => ({
    opType,
    input,
    output: [output],
    attribute,
  });
  const str = (name: string, v: string) => ({ name, type: proto.AttributeProto.AttributeType.STRING, s: new TextEncoder().encode(v) });
  const int = (name: string, i: number) => ({ name, type: proto.AttributeProto.AttributeType.INT, i });
  const dims = (d: (number | string)[]) => ({ dim: d.map((v) => (typeof v === "string" ? { dimParam: v } : { dimValue: v })) });
  return proto.ModelProto.encode({
    irVersion: 8,
    opsetImport: [{ domain: "", version: 18 }],
    graph: {
      name: "resize",
      node: [
        node("Cast", ["x"], "xf", [int("to", f.FLOAT)]),
        node("Resize", ["xf", "", "", "sizes"], "r", [str("mode", "linear"), int("antialias", 1), str("coordinate_transformation_mode", "half_pixel")]),
        node("Round", ["r"], "rr"),
        node("Clip", ["rr", "lo", "hi"], "rc"),
        node("Cast", ["rc"], "y", [int("to", f.UINT8)]),
      ],
      initializer: [
        { name: "sizes", dims: [4], dataType: f.INT64, int64Data: [1, size, size, 3] },
        { name: "lo", dims: [], dataType: f.FLOAT, rawData: new Uint8Array(Float32Array.of(0).buffer) },
        { name: "hi", dims: [], dataType: f.FLOAT, rawData: new Uint8Array(Float32Array.of(255).buffer) },
      ],
      input: [{ name: "x", type: { tensorType: { elemType: f.UINT8, shape: dims([1, "H", "W", 3]) } } }],
      output: [{ name: "y", type: { tensorType: { elemType: f.UINT8, shape: dims([1, size, size, 3]) } } }],
    },
  }).finish();
}

/** The centred square of opaque RGB pixels, cut at whole pixels. */
function square(p: Pixels): Pixels {
  const side = Math.min(p.width, p.height);
  const x0 = Math.floor((p.width - side) / 2);
  const y0 = Math.floor((p.height - side) / 2);
  const data = new Uint8Array(side * side * 3);
  for (let y = 0; y < side; y++)
    for (let x = 0; x < side; x++) for (let c = 0; c < 3; c++) data[(y * side + x) * 3 + c] = p.data[((y + y0) * p.width + x + x0) * p.channels + c] as number;
  return { data, width: side, height: side, channels: 3 };
}

const images: { name: string; pixels: Pixels }[] = [];
let photos = 0;
for (const i of await sampleDataset({ perLabel: 5, size: 128 })) images.push({ name: i.file, pixels: square(await decodeImage(i.bytes)) });
if (hasShared("data", "hymenoptera_data", "val")) {
  const dir = join(SHARED, "data", "hymenoptera_data", "val");
  const files = readdirSync(dir, { recursive: true, encoding: "utf8" }).filter((f) => /\.jpe?g$/i.test(f));
  for (const f of files.slice(0, limit)) images.push({ name: f, pixels: square(await decodeImage(new Uint8Array(readFileSync(join(dir, f))))) });
  photos = Math.min(limit, files.length);
}

console.log(`# ${machine()}, ${images.length} images (${photos} photos)`);
for (const size of sizes) {
  const session = await ort.InferenceSession.create(resizeGraph(size));
  const stats = { onnx: { differ: 0, max: 0, images: 0 }, sharp: { differ: 0, max: 0, images: 0 } };
  let total = 0;
  for (const { pixels } of images) {
    const edge = Uint8Array.from(preprocess(pixels, size, { version: 2, fit: "center-crop", normalization: "0-255" }));
    const out = await session.run({ x: new ort.Tensor("uint8", pixels.data as Uint8Array, [1, pixels.height, pixels.width, 3]) });
    const viaOnnx = out.y?.data as Uint8Array;
    const viaSharp = new Uint8Array(
      await sharp(pixels.data, { raw: { width: pixels.width, height: pixels.height, channels: 3 } })
        .resize(size, size, { kernel: "linear" })
        .raw()
        .toBuffer(),
    );
    total += edge.length;
    for (const [name, got] of [
      ["onnx", viaOnnx],
      ["sharp", viaSharp],
    ] as const) {
      const s = stats[name];
      let any = false;
      for (let i = 0; i < edge.length; i++) {
        const d = Math.abs((edge[i] as number) - (got[i] as number));
        if (d > 0) {
          s.differ++;
          any = true;
        }
        s.max = Math.max(s.max, d);
      }
      if (any) s.images++;
    }
  }
  await session.release();
  for (const [name, s] of Object.entries(stats))
    console.log(
      `${size} px, ${name === "onnx" ? "ONNX Resize (opset 18, linear, antialias)" : 'sharp resize(kernel "linear")'}: ` +
        `${s.images}/${images.length} images differ, ${((100 * s.differ) / total).toFixed(2)} % of values, max ${s.max} levels`,
    );
}
