/** Test fixtures for the contracts: a valid record that tests break one field at a time. */
import type { ArtifactMetadata } from "./artifact.ts";

const sha = "a".repeat(64);
export const validMetadata = (): ArtifactMetadata => ({
  schemaVersion: 1,
  name: "pets",
  version: "v0123456789ab",
  createdAt: "2026-11-27T10:00:00.000Z",
  labels: ["cat", "dog"],
  input: { size: 128, channels: 3 },
  preprocessing: { version: 1, fit: "center-crop", normalization: "0-1" },
  base: { id: "nsfwjs-mobilenet-v2", sha256: sha, featureLayer: "out_relu" },
  strategy: "head",
  hyperparameters: { epochs: 10, learningRate: 0.001 },
  dataset: { name: "pets", fingerprint: sha, images: 100, skipped: 0 },
  metrics: { accuracy: 0.9, evaluatedOn: 20, perClass: {} },
  weights: { dtype: "float16", bytes: 1000 },
  libraries: { "@tensorflow/tfjs-core": "4.22.0" },
  files: [
    { path: "model.json", sha256: sha, bytes: 10 },
    { path: "group1-shard1of1.bin", sha256: sha, bytes: 1000 },
  ],
});
