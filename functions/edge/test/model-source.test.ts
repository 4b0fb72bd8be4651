import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readListedFile } from "#shared/artifacts.ts";
import { sha256Hex } from "#shared/hash.ts";
import { ObjectTooLargeError } from "#shared/s3/store.ts";
import { createModelSource, type ModelSource } from "../src/model/source.ts";

// The worker's HTTP model source against a real HTTP origin (MODELS_BASE_URL): a read with a size bound
// refuses a larger object, whether the origin says its length up front or streams it.
const body = new Uint8Array(100).fill(7);
let server: Server;
let source: ModelSource;
beforeAll(async () => {
  server = createServer((req, res) => {
    // `chunked`: no Content-Length, the body in two pieces.
    if (req.url?.includes("chunked")) {
      res.write(body.subarray(0, 60));
      setTimeout(() => res.end(body.subarray(60)), 5);
      return;
    }
    res.setHeader("content-length", body.byteLength);
    res.end(body);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  source = createModelSource({ MODELS_BASE_URL: `http://127.0.0.1:${(server.address() as AddressInfo).port}` });
});
afterAll(() => new Promise<void>((r) => server.close(() => r())));

describe("model source reads bounded by a listed size", () => {
  it("refuses an object larger than allowed, by its Content-Length or as it streams, and reads one that fits", async () => {
    for (const key of ["models/m/v/sized.bin", "models/m/v/chunked.bin"]) {
      await expect(source.get(key, { maxBytes: 99 }), key).rejects.toBeInstanceOf(ObjectTooLargeError);
      expect(await source.get(key, { maxBytes: 100 }), key).toEqual(body);
      expect(await source.get(key), key).toEqual(body);
    }
  });

  it("reads a version's file no larger than its listing says", async () => {
    const file = { path: "head-shard1of1.bin", sha256: await sha256Hex(body), bytes: 64 };
    await expect(readListedFile(source, "m", "v0123456789ab", file)).rejects.toBeInstanceOf(ObjectTooLargeError);
    expect(await readListedFile(source, "m", "v0123456789ab", { ...file, bytes: 100 })).toEqual(body);
  });
});
