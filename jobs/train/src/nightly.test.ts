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
      async (dataset, strategy) => {
        submitted.push(`${dataset}:${strategy}`);
        return `job-${dataset}`;
      },
      memoryLogger(),
    );
    expect(r.submitted).toEqual([{ dataset: "changed", jobId: "job-changed" }]);
    expect(r.unchanged).toEqual(["unchanged"]);
    expect(r.failed).toEqual([{ dataset: "one-label", reason: expect.stringMatching(/at least 2 label folders/) }]);
    expect(submitted).toEqual(["changed:head"]);
    // Uploads (named datasets): always submitted, with the strategy the plan says, even when nothing
    // changed or the dataset cannot train — the job closes the upload's status record either way.
    await uploadSample(s3.store, "tuned", { perLabel: 8, manifest: { strategy: "finetune" } });
    const one = await dispatchNightly(s3.store, options, async (dataset, strategy) => `job-${dataset}-${strategy}`, memoryLogger(), [
      "tuned",
      "unchanged",
      "one-label",
    ]);
    expect(one.submitted).toEqual([
      { dataset: "tuned", jobId: "job-tuned-finetune" },
      { dataset: "unchanged", jobId: "job-unchanged-head" },
      { dataset: "one-label", jobId: "job-one-label-head" },
    ]);
    expect(one.failed).toEqual([]);
  });

  it("submits head runs to the CPU queue and fine-tuning to the GPU queue, only inside AWS Batch (AWS Batch faked at the SDK boundary)", async () => {
    expect(batchSubmitter({ EDGETUNE_JOB_QUEUE: "q", EDGETUNE_TRAIN_JOB_DEFINITION: "d" })).toBeUndefined(); // not in Batch
    const sent: SubmitJobCommand[] = [];
    const client = {
      send: async (c: SubmitJobCommand) => {
        sent.push(c);
        return { jobId: "j-1" };
      },
    };
    const gpuOnly = batchSubmitter({ AWS_BATCH_JOB_ID: "d-1", EDGETUNE_JOB_QUEUE: "arn:queue", EDGETUNE_TRAIN_JOB_DEFINITION: "arn:train:4" }, client as never);
    expect(await gpuOnly?.("pets", "head")).toBe("j-1");
    expect(sent[0]?.input).toEqual({ jobName: "edgetune-head-pets", jobQueue: "arn:queue", jobDefinition: "arn:train:4", parameters: { dataset: "pets" } });
    const both = batchSubmitter(
      {
        AWS_BATCH_JOB_ID: "d-1",
        EDGETUNE_JOB_QUEUE: "arn:queue",
        EDGETUNE_TRAIN_JOB_DEFINITION: "arn:train:4",
        EDGETUNE_CPU_JOB_QUEUE: "arn:cpu-queue",
        EDGETUNE_CPU_TRAIN_JOB_DEFINITION: "arn:train-cpu:2",
      },
      client as never,
    );
    await both?.("pets", "head");
    await both?.("pets", "finetune");
    expect(sent.slice(1).map((c) => [c.input.jobQueue, c.input.jobDefinition])).toEqual([
      ["arn:cpu-queue", "arn:train-cpu:2"],
      ["arn:queue", "arn:train:4"],
    ]);
  });
});
