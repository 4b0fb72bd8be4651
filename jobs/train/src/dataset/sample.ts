import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import sharp from "sharp";

/**
 * The sample dataset that installs with the project: Twemoji graphics (© Twitter, Inc. and other
 * contributors, CC-BY 4.0; SVGs from the npm package @twemoji/svg) labelled by their Unicode emoji
 * group (npm unicode-emoji-json, MIT). Rendered to PNG/JPEG on a white background, because that is
 * what users upload and what the edge decodes.
 */
export const SAMPLE_LABELS = {
  animals: "Animals & Nature",
  food: "Food & Drink",
  travel: "Travel & Places",
} as const;
export const SAMPLE_CREDIT = "Twemoji © Twitter, Inc. and other contributors, CC-BY 4.0 (npm @twemoji/svg); labels from npm unicode-emoji-json (MIT)";

export interface SampleImage {
  label: keyof typeof SAMPLE_LABELS;
  name: string;
  file: string;
  bytes: Uint8Array;
}

/**
 * `perLabel` images per label, rendered at `size` px. Images are taken in Unicode order with a
 * stride, so a small sample still spans the whole group; `offset` picks a disjoint set (for "new
 * images arrived" scenarios).
 */
export async function sampleDataset(options: { perLabel: number; size?: number; offset?: number }): Promise<SampleImage[]> {
  const require = createRequire(import.meta.url);
  const data = require("unicode-emoji-json/data-by-emoji.json") as Record<string, { slug: string; group: string; skin_tone_support: boolean }>;
  const svgDir = dirname(require.resolve("@twemoji/svg/package.json"));
  const size = options.size ?? 128;
  const out: SampleImage[] = [];
  for (const [label, group] of Object.entries(SAMPLE_LABELS) as [keyof typeof SAMPLE_LABELS, string][]) {
    const members = Object.entries(data).filter(([, d]) => d.group === group);
    const stride = Math.max(1, Math.floor(members.length / (options.perLabel * 2)));
    let taken = 0;
    for (let i = (options.offset ?? 0) % stride; i < members.length && taken < options.perLabel; i += stride) {
      const [emoji, d] = members[i] as [string, { slug: string }];
      const code = [...emoji]
        .map((c) => (c.codePointAt(0) as number).toString(16))
        .filter((c) => c !== "fe0f")
        .join("-");
      const svg = await readFile(join(svgDir, `${code}.svg`)).catch(() => null);
      if (!svg) continue;
      const jpeg = taken % 3 === 2;
      const img = sharp(svg, { density: Math.ceil((72 * size) / 36) })
        .resize(size, size)
        .flatten({ background: "#ffffff" });
      const bytes = new Uint8Array(jpeg ? await img.jpeg({ quality: 90 }).toBuffer() : await img.png().toBuffer());
      out.push({ label, name: d.slug, file: `${label}/${d.slug}.${jpeg ? "jpg" : "png"}`, bytes });
      taken++;
    }
  }
  return out;
}
