import type { AddressInfo } from "node:net";
import { CreateBucketCommand } from "@aws-sdk/client-s3";
import { buildApp } from "fauxqs";
import { createS3Client, S3ObjectStore } from "../../shared/s3/client.ts";
import type { S3Config } from "../../shared/s3/config.ts";

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
