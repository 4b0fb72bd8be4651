import { DescribeJobsCommand, SubmitJobCommand } from "@aws-sdk/client-batch";
import { Command } from "commander";
import { describe, expect, it } from "vitest";
import { memoryLogger } from "../log.ts";
import { batchFanOut, embedCommand, FanOutHandedOver, fanOutHook, shardsFor } from "./fan-out.ts";

const request = { dataset: "flowers", shards: 4, base: "mobilenet-v2-100", imageSize: 224, views: 3, seed: 7 };

describe("fan-out", () => {
  it("fans out only above the threshold, with 2…maxShards children", () => {
    const f = { imagesPerShard: 1000, maxShards: 8 };
    expect(shardsFor(1000, f)).toBe(0);
    expect(shardsFor(1001, f)).toBe(2);
    expect(shardsFor(4500, f)).toBe(5);
    expect(shardsFor(100_000, f)).toBe(8);
  });

  it("passes every option that keys the feature cache to the children", () => {
    const args = embedCommand(request);
    const parsed = new Command().exitOverride().option("--dataset <d>").option("--shards <n>").option("--base <b>").option("--image-size <px>");
    parsed.option("--views <n>").option("--seed <n>").option("--json").parse(args.slice(1), { from: "user" });
    expect(args[0]).toBe("embed");
    expect(parsed.opts()).toEqual({ dataset: "flowers", shards: "4", base: "mobilenet-v2-100", imageSize: "224", views: "3", seed: "7", json: true });
  });

  it("exists only inside Batch, with the stack's job definition and queue", () => {
    expect(batchFanOut({})).toBeUndefined();
    expect(batchFanOut({ AWS_BATCH_JOB_ID: "p", EDGETUNE_JOB_QUEUE: "q" })).toBeUndefined();
    const f = batchFanOut({ AWS_BATCH_JOB_ID: "p", EDGETUNE_JOB_QUEUE: "q", EDGETUNE_EMBED_JOB_DEFINITION: "d", EDGETUNE_FAN_OUT_IMAGES_PER_SHARD: "500" });
    expect(f).toMatchObject({ imagesPerShard: 500, maxShards: 20 });
  });

  it("submits one array job and waits for its children (AWS Batch faked at the SDK boundary)", async () => {
    const sent: unknown[] = [];
    const states = [
      { status: "RUNNING", arrayProperties: { statusSummary: { SUCCEEDED: 1 } } },
      { status: "FAILED", arrayProperties: { statusSummary: { SUCCEEDED: 3, FAILED: 1 } } },
    ];
    const client = {
      send: async (command: unknown) => {
        sent.push(command);
        if (command instanceof SubmitJobCommand) return { jobId: "job-1" };
        if (command instanceof DescribeJobsCommand) return { jobs: [states.shift()] };
        throw new Error("unexpected command");
      },
    };
    const env = { AWS_BATCH_JOB_ID: "parent-9", EDGETUNE_JOB_QUEUE: "arn:queue", EDGETUNE_EMBED_JOB_DEFINITION: "arn:embed:3" };
    const f = batchFanOut(env, client as never, async () => {});
    const result = await f?.run(request, memoryLogger());
    expect(result).toEqual({ succeeded: 3, failed: 1 });
    const submit = (sent[0] as SubmitJobCommand).input;
    expect(submit).toMatchObject({
      jobQueue: "arn:queue",
      jobDefinition: "arn:embed:3",
      arrayProperties: { size: 4 },
      containerOverrides: { command: embedCommand(request), environment: [{ name: "EDGETUNE_FAN_OUT_PARENT", value: "parent-9" }] },
    });
    expect(sent.filter((c) => c instanceof DescribeJobsCommand)).toHaveLength(2);
  });

  it("in Batch, hands over instead of holding its GPU host: children, then a continuation that depends on them", async () => {
    const sent: (SubmitJobCommand | DescribeJobsCommand)[] = [];
    const client = {
      send: async (command: SubmitJobCommand | DescribeJobsCommand) => {
        sent.push(command);
        if (command instanceof DescribeJobsCommand) return { jobs: [{ jobId: "parent-9", jobDefinition: "arn:train:7", parameters: { dataset: "*" } }] };
        return { jobId: command.input.arrayProperties ? "array-1" : "continuation-1" };
      },
    };
    const env = {
      AWS_BATCH_JOB_ID: "parent-9",
      EDGETUNE_JOB_QUEUE: "arn:queue",
      EDGETUNE_EMBED_JOB_DEFINITION: "arn:embed:3",
      // Children on the CPU queue (embedding needs no GPU); the continuation on the job's own.
      EDGETUNE_EMBED_JOB_QUEUE: "arn:cpu-queue",
      EDGETUNE_FAN_OUT_IMAGES_PER_SHARD: "10",
    };
    const f = batchFanOut(env, client as never, async () => {});
    const hook = fanOutHook(f as NonNullable<typeof f>, { dataset: "flowers", base: "b", imageSize: 160, views: 3, seed: 42 }, memoryLogger());
    const e = await hook(Array.from({ length: 35 })).catch((err: unknown) => err);
    expect(e).toBeInstanceOf(FanOutHandedOver);
    expect(e).toMatchObject({ arrayJobId: "array-1", continuationJobId: "continuation-1" });
    const [children, , continuation] = sent as SubmitJobCommand[];
    expect(children?.input.arrayProperties).toEqual({ size: 4 });
    expect(children?.input.jobQueue).toBe("arn:cpu-queue");
    expect(continuation?.input).toEqual({
      jobName: "edgetune-flowers-after-embed",
      jobQueue: "arn:queue",
      jobDefinition: "arn:train:7",
      parameters: { dataset: "flowers" },
      dependsOn: [{ jobId: "array-1" }],
      containerOverrides: { environment: [{ name: "EDGETUNE_FAN_OUT", value: "off" }] },
    });
    // The continuation itself never fans out again.
    expect(batchFanOut({ ...env, EDGETUNE_FAN_OUT: "off" }, client as never)).toBeUndefined();
  });
});

describe("fan-out once per version", () => {
  it("a duplicate trigger of a version already handed over ends too, instead of submitting a second array job", async () => {
    const { startLocalS3 } = await import("../../../../infra/local/s3-server.ts");
    const { fanOutOnce } = await import("./pooled.ts");
    const s3 = await startLocalS3({ bucket: "fan-out-once" });
    try {
      let submitted = 0;
      const hook = async () => {
        submitted++;
        throw new FanOutHandedOver(`array-${submitted}`, `continuation-${submitted}`, 4);
      };
      const plan = { name: "flowers", version: "v0123456789ab" };
      const first = await fanOutOnce({ store: s3.store }, plan, hook)([]).catch((e: unknown) => e);
      const duplicate = await fanOutOnce({ store: s3.store }, plan, hook)([]).catch((e: unknown) => e);
      expect(submitted).toBe(1);
      expect(first).toMatchObject({ arrayJobId: "array-1", continuationJobId: "continuation-1" });
      expect(duplicate).toBeInstanceOf(FanOutHandedOver);
      expect(duplicate).toMatchObject({ arrayJobId: "array-1", continuationJobId: "continuation-1" });
    } finally {
      await s3.stop();
    }
  });
});
