import { DescribeJobQueuesCommand, type SubmitJobCommand } from "@aws-sdk/client-batch";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPointer } from "#shared/artifacts.ts";
import type { ModelPointer } from "#shared/contracts/artifact.ts";
import { requestMessage } from "#shared/contracts/request.ts";
import { hmacSha256Hex } from "#shared/hash.ts";
import { keys } from "#shared/keys.ts";
import { type LocalS3, startLocalS3 } from "../../../infra/local/s3-server.ts";
import { uploadSample } from "../../../test/support/datasets.ts";
import { fakeQuotas, UNREADABLE_NEW_ACCOUNT } from "../../../test/support/quotas.ts";
import { GPU_QUOTAS } from "./gpu-quota.ts";
import { memoryLogger } from "./log.ts";
import { initBackend } from "./model/backend.ts";
import { batchSubmitter, dispatchNightly, FineTuningUnavailable } from "./nightly.ts";
import { followRun, listRunStatuses, newRunId } from "./status.ts";
import { train } from "./train.ts";

let s3: LocalS3;
const OPERATOR = "operator-key-nightly-sweep";
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

  it("answers console requests whose trigger was lost: a request left waiting gets its outcome at night", async () => {
    await uploadSample(s3.store, "swept", { perLabel: 8 });
    await train(s3.store, { dataset: "swept", imageSize: 96, views: 1, head: { epochs: 3 }, promote: "always" }, memoryLogger());
    const issuedAt = new Date(Date.now() - 6 * 60 * 60 * 1000).toISOString(); // made six hours ago; its event went to the DLQ
    const pointer = (await readPointer(s3.store, "swept")) as ModelPointer;
    const unsigned = {
      id: `${issuedAt.slice(0, 19).replace(/[-:]/g, "")}-5eed0001`,
      model: "swept",
      kind: "rollback" as const,
      from: pointer.version,
      fromPromotedAt: pointer.promotedAt,
      to: "v0123456789ab",
      issuedAt,
    };
    const request = { schemaVersion: 1, ...unsigned, by: "console", signature: await hmacSha256Hex(OPERATOR, requestMessage(unsigned)) };
    await s3.store.put(keys.captureRequest("swept", request.id), JSON.stringify(request));
    process.env.EDGETUNE_CONSOLE_KEYS = OPERATOR;
    try {
      await dispatchNightly(s3.store, { imageSize: 96, views: 1 }, async (dataset) => `job-${dataset}`, memoryLogger());
    } finally {
      delete process.env.EDGETUNE_CONSOLE_KEYS;
    }
    expect(await s3.store.head(keys.captureRequest("swept", request.id))).toBeNull();
    const outcome = JSON.parse(new TextDecoder().decode((await s3.store.get(keys.captureOutcome("swept", request.id))) as Uint8Array));
    expect(outcome).toMatchObject({ state: "refused", message: expect.stringContaining("minutes a request stays valid") });
  });

  it("submits tonight's training before it reads anything under captures/ (the edge's key may fill it)", async () => {
    await uploadSample(s3.store, "before-traffic", { perLabel: 8 });
    // A model with traffic, and a flood of junk decisions written with the edge's key.
    await s3.store.put("models/flooded/current.json", "{}");
    for (let i = 0; i < 50; i++) await s3.store.put(`captures/flooded/decisions/20000101T000000-junk${String(i).padStart(8, "0")}.json`, "0123456789");
    const events: string[] = [];
    const store = Object.create(s3.store, {
      get: {
        value: (key: string, options?: { maxBytes?: number }) => {
          if (key.startsWith("captures/")) events.push("read captures/");
          return s3.store.get(key, options);
        },
      },
    }) as typeof s3.store;
    const r = await dispatchNightly(
      store,
      { imageSize: 96, views: 1, head: { epochs: 3 } },
      async (dataset) => {
        events.push(`submit ${dataset}`);
        return `job-${dataset}`;
      },
      memoryLogger(),
    );
    expect(r.submitted.map((s) => s.dataset)).toContain("before-traffic");
    expect(events.indexOf("submit before-traffic")).toBeGreaterThanOrEqual(0);
    expect(events.lastIndexOf("submit before-traffic")).toBeLessThan(events.indexOf("read captures/"));
    // …and the junk it read is gone.
    let left = 0;
    for await (const _ of s3.store.list("captures/flooded/decisions/")) left++;
    expect(left).toBe(0);
  });

  it("submits head runs to the CPU queue and fine-tuning to the GPU queue, only inside AWS Batch (AWS Batch faked at the SDK boundary)", async () => {
    expect(batchSubmitter({ EDGETUNE_JOB_QUEUE: "q", EDGETUNE_TRAIN_JOB_DEFINITION: "d" })).toBeUndefined(); // not in Batch
    const sent: SubmitJobCommand[] = [];
    const client = {
      send: async (c: SubmitJobCommand | DescribeJobQueuesCommand) => {
        if (c instanceof DescribeJobQueuesCommand) return { jobQueues: [{ jobQueueName: "q", state: "ENABLED", status: "VALID" }] };
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

  /** AWS Batch and Service Quotas faked at the SDK boundary: a GPU queue that exists or not, quotas by code (a throw: AccessDenied). */
  function fakeAws(options: { gpuQueue: boolean; quotas?: Record<string, number | Error>; defaults?: Record<string, number> }) {
    const submitted: string[] = [];
    const batch = {
      send: async (c: SubmitJobCommand | DescribeJobQueuesCommand) => {
        if (c instanceof DescribeJobQueuesCommand) return { jobQueues: options.gpuQueue ? [{ state: "ENABLED", status: "VALID" }] : [] };
        submitted.push(`${c.input.jobQueue}:${c.input.parameters?.dataset}`);
        return { jobId: `job-${submitted.length}` };
      },
    };
    const quotas = fakeQuotas(options.quotas, options.defaults);
    const env = {
      AWS_BATCH_JOB_ID: "dispatcher-1",
      AWS_REGION: "eu-west-1",
      EDGETUNE_JOB_QUEUE: "Edgetune-finetune",
      EDGETUNE_TRAIN_JOB_DEFINITION: "Edgetune-finetune",
      EDGETUNE_GPU_JOB_VCPUS: "4",
      EDGETUNE_CPU_JOB_QUEUE: "cpu",
      EDGETUNE_CPU_TRAIN_JOB_DEFINITION: "cpu-def",
    };
    return { submitted, submit: batchSubmitter(env, batch as never, quotas) };
  }

  it("ends an uploaded finetune run failed at once while no GPU stack is deployed: `push --wait` sees the reason, head runs still go", async () => {
    await uploadSample(s3.store, "tune-me", { perLabel: 8, manifest: { strategy: "finetune" } });
    const pushedAt = new Date().toISOString();
    const runId = newRunId();
    await s3.store.put(
      `status/tune-me/${runId}.json`,
      JSON.stringify({ schemaVersion: 1, runId, dataset: "tune-me", state: "queued", startedAt: pushedAt, updatedAt: pushedAt }),
    );
    const aws = fakeAws({ gpuQueue: false, quotas: { [GPU_QUOTAS.spot.code]: 8, [GPU_QUOTAS.onDemand.code]: 8 } });
    await expect(aws.submit?.("tune-me", "finetune")).rejects.toThrow(FineTuningUnavailable);
    process.env.AWS_BATCH_JOB_ID = "dispatcher-1"; // the dispatcher's own job, as Batch sets it
    const r = await dispatchNightly(s3.store, { imageSize: 96, views: 1 }, aws.submit as never, memoryLogger(), ["tune-me"]).finally(() => {
      delete process.env.AWS_BATCH_JOB_ID;
    });
    expect(r.failed).toEqual([
      { dataset: "tune-me", reason: expect.stringMatching(/Fine-tuning needs the GPU stack, which is not deployed here.*npm run deploy/) },
    ]);
    expect(aws.submitted).toEqual([]);
    const followed = await followRun(s3.store, "tune-me", pushedAt, () => {}, { pollMs: 10, timeoutMs: 2000 });
    expect(followed).toMatchObject({ runId, state: "failed", jobId: "dispatcher-1", reason: r.failed[0]?.reason });
    expect(await aws.submit?.("tune-me", "head")).toBe("job-1"); // the CPU path does not depend on the GPU stack
    expect(aws.submitted).toEqual(["cpu:tune-me"]);
  });

  it("refuses a finetune run whose vCPUs exceed the G quota, falling back to AWS's default when the account's cannot be read", async () => {
    // The account's quota unreadable (AccessDenied): AWS's default (0 on new accounts) decides, never "unknown = fits".
    const zero = fakeAws({ gpuQueue: true, quotas: UNREADABLE_NEW_ACCOUNT.account, defaults: UNREADABLE_NEW_ACCOUNT.defaults });
    await expect(zero.submit?.("pets", "finetune")).rejects.toThrow(
      /needs 4 vCPU of G instances, but "All G and VT Spot Instance Requests" \(L-3819A6DF\) is 0 vCPU \(AWS's default.*request at least 4 vCPU .* in the Service Quotas console \(EC2\), in eu-west-1/,
    );
    expect(zero.submitted).toEqual([]);
    const enough = fakeAws({ gpuQueue: true, quotas: { [GPU_QUOTAS.spot.code]: 0, [GPU_QUOTAS.onDemand.code]: 8 } });
    expect(await enough.submit?.("pets", "finetune")).toBe("job-1");
    expect(enough.submitted).toEqual(["Edgetune-finetune:pets"]);
    // Neither readable: submitted (a job without capacity is cancelled after runnableTimeoutMinutes, with the reason).
    const unknown = fakeAws({ gpuQueue: true });
    expect(await unknown.submit?.("pets", "finetune")).toBe("job-1");
    expect((await listRunStatuses(s3.store, "pets")).length).toBe(0);
  });
});
