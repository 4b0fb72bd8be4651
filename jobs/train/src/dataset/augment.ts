import type { Pixels, PreprocessOptions } from "#shared/preprocess.ts";

/**
 * Augmented views for the frozen-feature strategy. View 0 is the image as served; views 1… are
 * random crops (70–100 % of the centred square's side, anywhere in the frame), mirrored half of the
 * time. They are a fixed, seeded set per image, so their features are computed once and cached
 * like any other. Colour jitter is left out on purpose: it moves frozen ImageNet features less than
 * crops do and would add a second random source to reproduce.
 */
export function augmentation(pixels: Pixels, view: number, seed: number, id: string): PreprocessOptions {
  if (view === 0) return {};
  const rand = mulberry32(hashString(`${seed}:${id}:${view}`));
  const side = Math.min(pixels.width, pixels.height) * (0.7 + 0.3 * rand());
  const x = rand() * (pixels.width - side);
  const y = rand() * (pixels.height - side);
  return { region: { x, y, width: side, height: side }, flip: rand() < 0.5 };
}

function hashString(s: string): number {
  let h = 2166136261;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 16777619);
  return h >>> 0;
}

/** Small, fast, seedable PRNG (public domain); enough for augmentation and shuffling. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
