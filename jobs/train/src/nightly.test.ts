import type { SubmitJobCommand } from "@aws-sdk/client-batch";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type LocalS3, startLocalS3 } from "../../../infra/local/s3-server.ts";
import { uploadSample } from "../../../test/support/datasets.ts";
import { memoryLogger } from "./log.ts";
import { initBackend } from "./model/backend.ts";
import { batchSubmitter, dispatchNightly } from "./nightly.ts";
import { train } from "./train.ts";

let s3: LocalS3;
beforeAll(async () => {
  await initBackend();
  s3 = await startLocalS3({ bucket: "nightly" });
});
afterAll(async () => {
  await s3?.stop();
});

describe("nightly dispatch", () => {
  it("submits one training job per changed dataset; unchanged ones cost nothing, a broken one is reported and the rest go on", async () => {
    const options = { imageSize: 96 as const, views: 1, head: { epochs: 3 }, promote: "always" as const };
    await uploadSample(s3.store, "unchanged", { perLabel: 8 });
    await train(s3.store, { dataset: "unchanged", ...options }, memoryLogger());
    await uploadSample(s3.store, "changed", { perLabel: 8 });
    await uploadSample(s3.store, "one-label", { perLabel: 6, labels: ["food"] });
    await s3.store.put("datasets/uploading/food/a.png", new Uint8Array([1])); // no manifest yet
    const submitted: string[] = [];
    const r = await dispatchNightly(
      s3.store,
      options,
      async (dataset) => {
        submitted.push(dataset);
        return `job-${dataset}`;
      },
      memoryLogger(),
    );
    expect(r.submitted).toEqual([{ dataset: "changed", jobId: "job-changed" }]);
    expect(r.unchanged).toEqual(["unchanged"]);
    expect(r.failed).toEqual([{ dataset: "one-label", reason: expect.stringMatching(/at least 2 label folders/) }]);
    expect(submitted).toEqual(["changed"]);
  });

  it("submits to the stack's queue and Train definition, only inside AWS Batch (AWS Batch faked at the SDK boundary)", async () => {
    expect(batchSubmitter({ EDGETUNE_JOB_QUEUE: "q", EDGETUNE_TRAIN_JOB_DEFINITION: "d" })).toBeUndefined(); // not in Batch
    const sent: SubmitJobCommand[] = [];
    const client = {
      send: async (c: SubmitJobCommand) => {
        sent.push(c);
        return { jobId: "j-1" };
      },
    };
    const submit = batchSubmitter(
      { AWS_BATCH_JOB_ID: "nightly-1", EDGETUNE_JOB_QUEUE: "arn:queue", EDGETUNE_TRAIN_JOB_DEFINITION: "arn:train:4" },
      client as never,
    );
    expect(await submit?.("pets")).toBe("j-1");
    expect(sent[0]?.input).toEqual({ jobName: "edgetune-nightly-pets", jobQueue: "arn:queue", jobDefinition: "arn:train:4", parameters: { dataset: "pets" } });
  });
});
