import * as tf from "@tensorflow/tfjs";
import { describe, expect, it } from "vitest";
import { encodeWeights } from "./weights.ts";

/** The float16 bits encodeWeights writes for `value`. */
function toHalf(value: number): number {
  const encoded = encodeWeights([{ name: "w", shape: [1], dtype: "float32" }], Float32Array.of(value).buffer, "float16");
  return new DataView(encoded.data).getUint16(0, true);
}

describe("float16 encoding", () => {
  it("matches IEEE 754 half precision on known values", () => {
    expect(toHalf(0)).toBe(0);
    expect(toHalf(-0)).toBe(0x8000);
    expect(toHalf(1)).toBe(0x3c00);
    expect(toHalf(-2)).toBe(0xc000);
    expect(toHalf(65504)).toBe(0x7bff);
    expect(toHalf(1e6)).toBe(0x7c00);
    expect(toHalf(Number.NaN) & 0x7c00).toBe(0x7c00);
    expect(toHalf(2 ** -24)).toBe(1); // smallest subnormal
    expect(toHalf(1 + 2 ** -11)).toBe(0x3c00); // tie rounds to even
    expect(toHalf(1 + 3 * 2 ** -11)).toBe(0x3c02);
  });
});

describe("encodeWeights", () => {
  const specs: tf.io.WeightsManifestEntry[] = [
    { name: "dense/kernel", shape: [3, 4], dtype: "float32" },
    { name: "dense/bias", shape: [4], dtype: "float32" },
    { name: "steps", shape: [2], dtype: "int32" },
  ];
  const kernel = Float32Array.from({ length: 12 }, (_, i) => Math.sin(i) * 3.1);
  const bias = Float32Array.from([0.001, -0.5, 100.25, 0]);
  const data = new Uint8Array([...new Uint8Array(kernel.buffer), ...new Uint8Array(bias.buffer), ...new Uint8Array(Int32Array.from([7, -9]).buffer)]).buffer;

  for (const [dtype, tolerance] of [
    ["float32", 0],
    ["float16", 0.05],
    ["uint8", 0.03],
  ] as const) {
    it(`round-trips through tfjs's own decoder as ${dtype}`, () => {
      const encoded = encodeWeights(specs, data, dtype);
      const decoded = tf.io.decodeWeights(encoded.data, encoded.specs);
      const k = decoded["dense/kernel"]?.dataSync() as Float32Array;
      for (const [i, v] of kernel.entries()) {
        expect(Math.abs((k[i] as number) - v)).toBeLessThanOrEqual(tolerance * (dtype === "float16" ? Math.abs(v) + 0.01 : 6.2));
      }
      expect(Array.from(decoded.steps?.dataSync() ?? [])).toEqual([7, -9]);
      const expectedBytes = { float32: 64 + 8, float16: 32 + 8, uint8: 16 + 8 }[dtype];
      expect(encoded.data.byteLength).toBe(expectedBytes);
    });
  }
});
