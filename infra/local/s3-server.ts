import type { AddressInfo } from "node:net";
import { CreateBucketCommand } from "@aws-sdk/client-s3";
import type { FastifyReply, FastifyRequest } from "fastify";
import { buildApp } from "fauxqs";
import { createS3Client, S3ObjectStore } from "#shared/s3/client.ts";
import type { S3Config } from "#shared/s3/config.ts";

/**
 * A real S3 API server (fauxqs, in-process) on a free loopback port, with one bucket. Used by every
 * integration test and by the local stack. fauxqs's own `startFauxqs` binds 0.0.0.0; building the
 * app and listening ourselves keeps it on 127.0.0.1.
 */
export interface LocalS3 {
  endpoint: string;
  config: S3Config;
  store: S3ObjectStore;
  stop(): Promise<void>;
}

export async function startLocalS3(options: { bucket?: string; port?: number } = {}): Promise<LocalS3> {
  const app = buildApp({ logger: false });
  conditionalRequests(app);
  await app.listen({ port: options.port ?? 0, host: "127.0.0.1" });
  const { port } = app.server.address() as AddressInfo;
  const endpoint = `http://127.0.0.1:${port}`;
  const config: S3Config = {
    bucket: options.bucket ?? "edgetune-test",
    region: "us-east-1",
    endpoint,
    forcePathStyle: true,
    credentials: { accessKeyId: "local", secretAccessKey: "local-secret" },
  };
  const client = createS3Client(config);
  await client.send(new CreateBucketCommand({ Bucket: config.bucket }));
  return {
    endpoint,
    config,
    store: new S3ObjectStore(config, client),
    async stop() {
      client.destroy();
      await app.close();
    },
  };
}

type FauxqsApp = ReturnType<typeof buildApp>;

/**
 * fauxqs ignores conditional PUTs (`If-None-Match: *`, `If-Match: <etag>`) and conditional DELETEs
 * (`If-Match: <etag>`); real S3 answers 412 Precondition Failed when the key exists, or when it no longer
 * has that ETag. This hook gives the local server S3's semantics, atomically per key (conditional
 * requests of one key run one at a time), so locks, run-record claims and the edge's capture quota (a
 * compare-and-swap) behave here as they do in AWS.
 */
function conditionalRequests(app: FauxqsApp): void {
  const queues = new Map<string, Promise<void>>();
  const releases = new WeakMap<object, () => void>();
  app.addHook("onRequest", async (req: FastifyRequest, reply: FastifyReply) => {
    const ifMatch = req.headers["if-match"];
    const conditionalPut = req.method === "PUT" && (req.headers["if-none-match"] === "*" || typeof ifMatch === "string");
    const conditionalDelete = req.method === "DELETE" && typeof ifMatch === "string";
    if (!conditionalPut && !conditionalDelete) return;
    const path = req.url.split("?")[0] as string;
    const before = queues.get(path) ?? Promise.resolve();
    let release = () => {};
    const mine = new Promise<void>((resolve) => {
      release = resolve;
    });
    const tail = before.then(() => mine);
    queues.set(path, tail);
    const done = () => {
      release();
      if (queues.get(path) === tail) queues.delete(path);
    };
    releases.set(req.raw, done);
    await before;
    const head = await app.inject({ method: "HEAD", url: path });
    // If-None-Match: * fails when the key exists; If-Match fails unless it exists with that ETag.
    const failed = typeof ifMatch === "string" ? head.statusCode !== 200 || head.headers.etag !== ifMatch : head.statusCode === 200;
    if (failed) {
      done();
      return reply
        .code(412)
        .type("application/xml")
        .send("<Error><Code>PreconditionFailed</Code><Message>At least one of the pre-conditions you specified did not hold</Message></Error>");
    }
  });
  const finish = async (req: { raw: object }) => releases.get(req.raw)?.();
  app.addHook("onResponse", finish);
  app.addHook("onRequestAbort", finish);
}
