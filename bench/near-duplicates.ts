#!/usr/bin/env node
/**
 * `npm run bench:near-duplicates` — the near-duplicate signal of dataset/near-duplicates.ts (the input
 * hash) beside the one it does not use (the centred pooled features: similar is not the same photo),
 * measured side by side in one run: for distinct images (every pair) and for edited copies of them
 * (resized and re-encoded, JPEG quality 40, +15 % brightness, a 5 % crop, a 10 % shift), the input-hash
 * distance in bits and the cosine of the mean-centred pooled features, computed exactly as training does
 * (decode, shared preprocessing at `--size`, the base's feature layer, view 0). Photos from
 * ../shared/data/hymenoptera_data (skipped without it) and the bundled Twemoji sample.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import * as tf from "@tensorflow/tfjs";
import sharp from "sharp";
import { hashDistance, inputHash } from "#shared/image/input-hash.ts";
import { preprocess } from "#shared/preprocess.ts";
import { startLocalS3 } from "../infra/local/s3-server.ts";
import { DEFAULT_OPTIONS } from "../jobs/train/src/config.ts";
import { decodeImage } from "../jobs/train/src/dataset/decode.ts";
import { NEAR_DUPLICATE_BITS } from "../jobs/train/src/dataset/near-duplicates.ts";
import { sampleDataset } from "../jobs/train/src/dataset/sample.ts";
import { featureSpec } from "../jobs/train/src/features/extract.ts";
import { initBackend } from "../jobs/train/src/model/backend.ts";
import { ensureBase, loadBase } from "../jobs/train/src/model/bases.ts";
import { arg, BENCH_BASE, hasShared, machine, SHARED } from "./common.ts";

await initBackend();
const s3 = await startLocalS3();
const size = Number(arg("size", "224"));
const meta = await ensureBase(s3.store, arg("base", BENCH_BASE) as string);
const model = await loadBase(s3.store, meta, size);
const extractor = tf.model({ inputs: model.inputs, outputs: model.getLayer(meta.featureLayer).output as tf.SymbolicTensor });
const { preprocessing } = featureSpec(meta, { ...DEFAULT_OPTIONS, imageSize: size as 224 });

async function signals(bytes: Uint8Array): Promise<{ hash: string; vector: Float32Array }> {
  const input = preprocess(await decodeImage(bytes), size, preprocessing);
  const out = tf.tidy(() => (extractor.predict(tf.tensor4d(input, [1, size, size, 3])) as tf.Tensor).mean([1, 2]));
  const vector = out.dataSync() as Float32Array;
  out.dispose();
  return { hash: inputHash(input, 0, size), vector };
}
const edits: Record<string, (b: Uint8Array, w: number, h: number) => Promise<Buffer>> = {
  "60 % size, re-encoded": (b, w) =>
    sharp(b)
      .resize(Math.round(w * 0.6))
      .jpeg({ quality: 80 })
      .toBuffer(),
  "JPEG quality 40": (b) => sharp(b).flatten({ background: "#fff" }).jpeg({ quality: 40 }).toBuffer(),
  "+15 % brightness": (b) => sharp(b).modulate({ brightness: 1.15 }).toBuffer(),
  "5 % crop": (b, w, h) =>
    sharp(b)
      .extract({ left: Math.round(w * 0.05), top: Math.round(h * 0.05), width: Math.round(w * 0.9), height: Math.round(h * 0.9) })
      .toBuffer(),
  "10 % shift": (b, w, h) =>
    sharp(b)
      .extract({ left: Math.round(w * 0.1), top: 0, width: Math.round(w * 0.9), height: h })
      .toBuffer(),
};
const q = (a: number[], p: number) => [...a].sort((x, y) => x - y)[Math.floor(p * (a.length - 1))] as number;

async function measure(name: string, files: Uint8Array[], edited: number) {
  const base = await Promise.all(files.map(signals));
  const mean = new Float64Array(base[0]?.vector.length ?? 0);
  for (const s of base) for (let i = 0; i < s.vector.length; i++) mean[i] = (mean[i] as number) + (s.vector[i] as number) / base.length;
  const cos = (a: Float32Array, b: Float32Array) => {
    let d = 0;
    let na = 0;
    let nb = 0;
    for (let i = 0; i < a.length; i++) {
      const x = (a[i] as number) - (mean[i] as number);
      const y = (b[i] as number) - (mean[i] as number);
      d += x * y;
      na += x * x;
      nb += y * y;
    }
    return d / Math.sqrt(na * nb);
  };
  const bits: number[] = [];
  const cosines: number[] = [];
  for (let i = 0; i < base.length; i++)
    for (let j = i + 1; j < base.length; j++) {
      bits.push(hashDistance((base[i] as { hash: string }).hash, (base[j] as { hash: string }).hash));
      cosines.push(cos((base[i] as { vector: Float32Array }).vector, (base[j] as { vector: Float32Array }).vector));
    }
  const caught = (b: number, _c: number) => b <= NEAR_DUPLICATE_BITS;
  console.log(`\n${name}: ${files.length} images, ${bits.length} distinct pairs, edits of the first ${edited}\n`);
  console.log(
    "| pairs | hash bits apart: min / 10th pct / median | centred feature cosine: median / 90th pct / max | flagged as near-duplicates |\n|---|---|---|---|",
  );
  const flagged = bits.filter((b, k) => caught(b, cosines[k] as number)).length;
  console.log(
    `| distinct | ${Math.min(...bits)} / ${q(bits, 0.1)} / ${q(bits, 0.5)} | ${q(cosines, 0.5).toFixed(2)} / ${q(cosines, 0.9).toFixed(2)} / ${Math.max(...cosines).toFixed(2)} | ${flagged} of ${bits.length} |`,
  );
  for (const [label, edit] of Object.entries(edits)) {
    const b: number[] = [];
    const c: number[] = [];
    for (let i = 0; i < edited; i++) {
      const bytes = files[i] as Uint8Array;
      const m = await sharp(bytes).metadata();
      const e = await signals(new Uint8Array(await edit(bytes, m.width as number, m.height as number)));
      b.push(hashDistance((base[i] as { hash: string }).hash, e.hash));
      c.push(cos((base[i] as { vector: Float32Array }).vector, e.vector));
    }
    const n = b.filter((x, k) => caught(x, c[k] as number)).length;
    console.log(
      `| ${label} | ${Math.min(...b)} / ${q(b, 0.5)} / ${q(b, 0.9)} (min / median / 90th pct) | ${q(c, 0.1).toFixed(2)} / ${q(c, 0.5).toFixed(2)} / ${Math.min(...c).toFixed(2)} (10th pct / median / min) | ${n} of ${edited} |`,
    );
  }
}

console.log(
  `Near-duplicate signals — base ${meta.id}, ${size} px; flagged: input hashes ≤ ${NEAR_DUPLICATE_BITS} bits apart (the feature cosine is shown, not used) (${machine()})`,
);
if (hasShared("data", "hymenoptera_data")) {
  const dir = join(SHARED, "data", "hymenoptera_data", "train");
  const files = ["ants", "bees"].flatMap((l) =>
    readdirSync(join(dir, l))
      .slice(0, 60)
      .map((f) => new Uint8Array(readFileSync(join(dir, l, f)))),
  );
  await measure("hymenoptera photos", files, 30);
} else console.log("\n(../shared/data/hymenoptera_data absent: photos skipped)");
await measure(
  "Twemoji icons at 128 px",
  (await sampleDataset({ perLabel: 40, size: 128 })).map((i) => i.bytes),
  30,
);
await s3.stop();
