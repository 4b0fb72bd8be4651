import { copyFileSync, existsSync, readdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { Stack } from "aws-cdk-lib";
import { Annotations, Match, Template } from "aws-cdk-lib/assertions";
import * as ecs from "aws-cdk-lib/aws-ecs";
import * as s3 from "aws-cdk-lib/aws-s3";
import { beforeAll, describe, expect, it, vi } from "vitest";
import { buildApp } from "./app.ts";
import { startLocalS3 } from "./local/s3-server.ts";

/**
 * The synthesized template, checked resource by resource, plus cdk-nag's AwsSolutions rules (a
 * violation makes synth throw). Synth is offline: the training image is staged, not built.
 */
let template: Template;
/** The GPU fine-tuning stack, deployed apart from the core. */
let gpuTemplate: Template;
let stack: Stack;
let gpuStack: Stack;
const digest = `nvidia/cuda:11.2.2-cudnn8-runtime-ubuntu20.04@sha256:${"ab".repeat(32)}`;
beforeAll(() => {
  const built = buildApp({ edgetune: { alarmEmail: "ops@example.com", timeZone: "Europe/Paris", gpuBaseImage: digest } });
  stack = built.stack;
  gpuStack = built.gpu;
  built.app.synth(); // runs cdk-nag; throws on any unacknowledged finding
  template = Template.fromStack(stack);
  gpuTemplate = Template.fromStack(gpuStack);
}, 120_000);

type Statement = { Effect: string; Action: string | string[]; Resource: unknown; Principal?: unknown; Condition?: unknown };
function statements(): Statement[] {
  const out: Statement[] = [];
  for (const type of ["AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"]) {
    for (const r of Object.values(template.findResources(type)))
      out.push(...((r.Properties as { PolicyDocument: { Statement: Statement[] } }).PolicyDocument.Statement ?? []));
  }
  return out;
}
/** The statements of the policies attached to the training job's role. */
function jobRoleStatements(t: Template, role = "TrainingJobRole"): Statement[] {
  const [roleId] = Object.entries(t.findResources("AWS::IAM::Role")).find(([id]) => id.startsWith(role)) ?? [];
  return Object.values(t.findResources("AWS::IAM::Policy"))
    .filter((p) => JSON.stringify((p.Properties as { Roles: unknown }).Roles).includes(`"${roleId}"`))
    .flatMap((p) => (p.Properties as { PolicyDocument: { Statement: Statement[] } }).PolicyDocument.Statement);
}
const actions = (s: Statement) => (Array.isArray(s.Action) ? s.Action : [s.Action]);

describe("data bucket", () => {
  it("is encrypted, versioned, private, TLS-only, logs access and sends EventBridge events", () => {
    template.hasResourceProperties("AWS::S3::Bucket", {
      BucketEncryption: { ServerSideEncryptionConfiguration: [{ ServerSideEncryptionByDefault: { SSEAlgorithm: "AES256" } }] },
      VersioningConfiguration: { Status: "Enabled" },
      PublicAccessBlockConfiguration: { BlockPublicAcls: true, BlockPublicPolicy: true, IgnorePublicAcls: true, RestrictPublicBuckets: true },
      LoggingConfiguration: Match.objectLike({ LogFilePrefix: "data/" }),
    });
    // CDK turns EventBridge notifications on through its notifications custom resource.
    template.hasResourceProperties("Custom::S3BucketNotifications", { NotificationConfiguration: { EventBridgeConfiguration: {} } });
    template.hasResourceProperties("AWS::S3::BucketPolicy", {
      PolicyDocument: { Statement: Match.arrayWith([Match.objectLike({ Effect: "Deny", Condition: { Bool: { "aws:SecureTransport": "false" } } })]) },
    });
  });

  it("has lifecycle rules for multipart uploads, noncurrent versions, the cache and run state, and none that expires models", () => {
    const buckets = template.findResources("AWS::S3::Bucket", { Properties: { VersioningConfiguration: { Status: "Enabled" } } });
    const bucket = Object.values(buckets)[0] as { Properties: { LifecycleConfiguration: { Rules: Record<string, unknown>[] } } };
    const rules = bucket.Properties.LifecycleConfiguration.Rules;
    const ids = rules.map((r) => r.Id);
    expect(ids).toEqual(
      expect.arrayContaining([
        "abort-incomplete-multipart",
        "noncurrent-versions",
        "embedding-cache",
        "run-state",
        "run-status",
        "lock-heartbeats",
        "captures",
      ]),
    );
    // Captured traffic expires after 30 days by default, its overwritten versions after one.
    expect(rules.find((r) => r.Id === "captures")).toMatchObject({
      Prefix: "captures/",
      ExpirationInDays: 30,
      NoncurrentVersionExpiration: { NoncurrentDays: 1 },
    });
    // A request's claim must outlive the 30 minutes a request is valid (MAX_REQUEST_AGE_MS), not more.
    expect(rules.find((r) => r.Id === "request-claims")).toMatchObject({ Prefix: "requests/", ExpirationInDays: 2 });
    for (const r of rules)
      expect(r.Prefix === "models/" || r.Prefix === "datasets/" || (r.Prefix === undefined && r.ExpirationInDays !== undefined)).toBe(false);
  });

  it("grants nothing public and no access to any other bucket", () => {
    for (const s of statements()) {
      expect(s.Principal).not.toBe("*");
      // ECR's token call and Batch's DescribeJobs have no resource-level permissions: the only "*" allowed.
      if (
        [
          '"ecr:GetAuthorizationToken"',
          '"batch:DescribeJobs"',
          '["batch:DescribeJobQueues","servicequotas:GetServiceQuota","servicequotas:GetAWSDefaultServiceQuota"]',
        ].includes(JSON.stringify(s.Action))
      )
        continue;
      expect(JSON.stringify(s.Resource)).not.toMatch(/"arn:aws:s3:::\*"|^"\*"$/);
      if (actions(s).some((a) => a.startsWith("s3:"))) expect(JSON.stringify(s.Resource)).toMatch(/Data178AD3D0|AccessLogs/);
    }
    for (const p of Object.values(template.findResources("AWS::S3::BucketPolicy"))) {
      for (const s of (p.Properties as { PolicyDocument: { Statement: Statement[] } }).PolicyDocument.Statement) {
        if (s.Effect === "Allow") expect(JSON.stringify(s.Principal)).not.toBe('"*"');
      }
    }
  });
});

describe("GPU batch job", () => {
  it("uses spot first and on-demand second, scaling to zero, on the NVIDIA ECS AMI", () => {
    const envs = Object.values(gpuTemplate.findResources("AWS::Batch::ComputeEnvironment")).map(
      (r) => r.Properties as { ComputeResources: Record<string, unknown> },
    );
    expect(envs).toHaveLength(2);
    const types = envs.map((e) => e.ComputeResources.Type).sort();
    expect(types).toEqual(["EC2", "SPOT"]);
    for (const e of envs) {
      expect(e.ComputeResources.MinvCpus).toBe(0);
      // T4 (sm_75) only: libtensorflow 2.9.1 has native kernels for it; g5's A10G would JIT-compile in every container.
      expect(e.ComputeResources.InstanceTypes).toEqual(["g4dn.xlarge"]);
      expect(e.ComputeResources.Ec2Configuration).toEqual([{ ImageType: "ECS_AL2023_NVIDIA" }]);
    }
    gpuTemplate.hasResourceProperties("AWS::Batch::JobQueue", {
      JobQueueName: "Edgetune-finetune",
      ComputeEnvironmentOrder: Match.arrayWith([Match.objectLike({ Order: 1 }), Match.objectLike({ Order: 2 })]),
    });
    // The core holds no GPU resource: a failed GPU build cannot take it down.
    expect(JSON.stringify(template.toJSON())).not.toMatch(/"GPU"|ECS_AL2023_NVIDIA|jobs\/train\/Dockerfile"/);
  });

  it("requests 1 GPU, less memory than a g4dn.xlarge, a timeout, retries only spot reclaims, and refuses to fall back to wasm", () => {
    gpuTemplate.hasResourceProperties("AWS::Batch::JobDefinition", {
      JobDefinitionName: "Edgetune-finetune",
      ContainerProperties: Match.objectLike({
        ResourceRequirements: Match.arrayWith([
          { Type: "MEMORY", Value: String(14 * 1024) },
          { Type: "GPU", Value: "1" },
        ]),
        Command: ["train", "--dataset", "Ref::dataset", "--json"],
        User: "node",
        Environment: Match.arrayWith([{ Name: "EDGETUNE_BACKEND", Value: "tensorflow" }]),
      }),
      Timeout: { AttemptDurationSeconds: 4 * 3600 },
      RetryStrategy: {
        Attempts: 3,
        EvaluateOnExit: [
          { Action: "RETRY", OnStatusReason: "Host EC2*" },
          { Action: "EXIT", OnReason: "*" },
        ],
      },
    });
  });

  it("has array-capable embedding and head-only training jobs on the CPU queue (Fargate), same image and role", () => {
    const defs = template.findResources("AWS::Batch::JobDefinition");
    const byCommand = (c: string) => Object.entries(defs).find(([, d]) => JSON.stringify(d).includes(c)) ?? [];
    const [, embed] = byCommand('"embed","--dataset","Ref::dataset","--shards","Ref::shards"');
    const cpuTrain = Object.entries(defs).find(([id]) => id.startsWith("TrainingTrainCpu"))?.[1];
    for (const d of [embed, cpuTrain]) {
      const text = JSON.stringify(d);
      expect(text).toContain('"PlatformCapabilities":["FARGATE"]');
      expect(text).not.toContain('"GPU"');
      // No GPU: tfjs on wasm, the frozen base on ONNX Runtime.
      expect(text).toContain('{"Name":"EDGETUNE_BACKEND","Value":"wasm"}');
      expect(text).toMatch(/"JobRoleArn":\{"Fn::GetAtt":\["TrainingJobRole/);
    }
    expect(JSON.stringify(cpuTrain)).toContain('"Command":["train","--dataset","Ref::dataset","--json"]');
    // The CPU jobs run their own image (no CUDA): a different asset from the GPU definition's.
    const imageOf = (d: unknown) => JSON.stringify((d as { Properties: { ContainerProperties: { Image: unknown } } }).Properties.ContainerProperties.Image);
    const gpuTrain = Object.values(gpuTemplate.findResources("AWS::Batch::JobDefinition"))[0];
    expect(imageOf(cpuTrain)).toBe(imageOf(embed));
    expect(imageOf(cpuTrain)).not.toBe(imageOf(gpuTrain));
    template.resourceCountIs("AWS::Batch::JobDefinition", 3); // train (CPU), embed, dispatcher
    gpuTemplate.resourceCountIs("AWS::Batch::JobDefinition", 1); // train (GPU)
  });

  it("lets a training job fan out to embedding children on the CPU queue, its continuation on its own queue, and nothing more", () => {
    const defs = template.findResources("AWS::Batch::JobDefinition");
    const queues = template.findResources("AWS::Batch::JobQueue");
    const queueId = (prefix: string) => Object.keys(queues).find((id) => id.startsWith(prefix)) as string;
    const [embedId] = Object.entries(defs).find(([, d]) => JSON.stringify(d).includes('"embed"')) ?? [];
    const envOf = (prefix: string, t = template) => {
      const d = Object.entries(t.findResources("AWS::Batch::JobDefinition")).find(([id]) => new RegExp(`^${prefix}[0-9A-F]{8}$`).test(id))?.[1] as {
        Properties: { ContainerProperties: { Environment: { Name: string; Value: unknown }[] } };
      };
      return Object.fromEntries(d.Properties.ContainerProperties.Environment.map((e) => [e.Name, e.Value]));
    };
    const gpu = envOf("GpuTrain", gpuTemplate);
    const cpu = envOf("TrainingTrainCpu");
    // Embed by its fixed name (the latest revision); the GPU stack reads the CPU queue through an export.
    expect(defs[embedId as string]).toMatchObject({ Properties: { JobDefinitionName: "Edgetune-embed" } });
    expect([cpu.EDGETUNE_EMBED_JOB_DEFINITION, gpu.EDGETUNE_EMBED_JOB_DEFINITION]).toEqual(["Edgetune-embed", "Edgetune-embed"]);
    expect(JSON.stringify(gpu.EDGETUNE_EMBED_JOB_QUEUE)).toContain(queueId("TrainingCpuQueue"));
    for (const env of [gpu, cpu]) expect(env.EDGETUNE_FAN_OUT_IMAGES_PER_SHARD).toBe("20000");
    expect(JSON.stringify(cpu.EDGETUNE_EMBED_JOB_QUEUE)).toContain(queueId("TrainingCpuQueue"));
    expect(JSON.stringify(gpu.EDGETUNE_JOB_QUEUE)).toContain('"GpuQueue');
    expect(JSON.stringify(cpu.EDGETUNE_JOB_QUEUE)).toContain(`"${queueId("TrainingCpuQueue")}"`);
    // 32 CPU vCPUs / 4 per job: 8 children beside a GPU parent, 7 beside a CPU parent.
    expect([gpu.EDGETUNE_FAN_OUT_MAX_SHARDS, cpu.EDGETUNE_FAN_OUT_MAX_SHARDS]).toEqual(["8", "7"]);
    const submit = jobRoleStatements(template).filter((st) => actions(st).some((a) => a.startsWith("batch:")));
    expect(submit.flatMap(actions).sort()).toEqual(["batch:DescribeJobs", "batch:SubmitJob"]);
    const resources = submit.find((st) => actions(st).includes("batch:SubmitJob"))?.Resource as unknown[];
    // The Embed definition, both Train definitions (continuations) and both queues; no wildcard.
    expect(resources).toHaveLength(5);
    // Wildcards only for revisions: of Embed (submitted by name) and of the two Train definitions (a continuation submits the revision it started with).
    expect(JSON.stringify(resources).match(/\*/g)).toHaveLength(3);
    expect(JSON.stringify(resources)).toMatch(
      /job-definition\/Edgetune-embed:\*".*job-definition\/Edgetune-finetune:\*".*job-definition\/.*TrainingTrainCpu.*:\*"/,
    );
    expect(JSON.stringify(resources)).toContain(":job-queue/Edgetune-finetune");
  });

  it("does not fan out where the CPU queue has no room for a child beside the parent", () => {
    const small = buildApp({ edgetune: { cpuMaxVcpus: 4, cpuJobVcpus: 4 } });
    const t = Template.fromStack(small.stack);
    const cpuTrain = Object.entries(t.findResources("AWS::Batch::JobDefinition")).find(([id]) => id.startsWith("TrainingTrainCpu"))?.[1];
    expect(JSON.stringify(cpuTrain)).not.toContain("EDGETUNE_EMBED_JOB_DEFINITION");
  });

  it("runs in public subnets without a NAT gateway, with an S3 gateway endpoint and no inbound rule", () => {
    template.resourceCountIs("AWS::EC2::NatGateway", 0);
    template.hasResourceProperties("AWS::EC2::VPCEndpoint", { VpcEndpointType: "Gateway", ServiceName: Match.objectLike({}) });
    for (const sg of Object.values(template.findResources("AWS::EC2::SecurityGroup")))
      expect((sg.Properties as { SecurityGroupIngress?: unknown }).SecurityGroupIngress).toBeUndefined();
  });

  it("cancels a job stuck in RUNNABLE (no capacity, a quota of 0, a misfit) after an hour, with the reason, on both queues", () => {
    for (const t of [template, gpuTemplate])
      t.hasResourceProperties("AWS::Batch::JobQueue", {
        JobStateTimeLimitActions: [
          "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY",
          "MISCONFIGURATION:COMPUTE_ENVIRONMENT_MAX_RESOURCE",
          "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT",
        ].map((Reason) => ({ Action: "CANCEL", MaxTimeSeconds: 3600, Reason, State: "RUNNABLE" })),
      });
  });

  it("lets a run waiting for another run of its model give up before its own timeout", () => {
    for (const t of [template, gpuTemplate])
      t.hasResourceProperties("AWS::Batch::JobDefinition", {
        Timeout: { AttemptDurationSeconds: 4 * 3600 },
        ContainerProperties: Match.objectLike({ Environment: Match.arrayWith([{ Name: "EDGETUNE_LOCK_WAIT_MS", Value: String(3.5 * 3600 * 1000) }]) }),
      });
  });

  it("lets the job delete only its run state (runs/, locks/): never a model, a base or the feature cache", () => {
    const deletes = jobRoleStatements(template).filter((s) => actions(s).some((a) => a.startsWith("s3:Delete")));
    expect(deletes.length).toBeGreaterThan(0);
    for (const s of deletes) expect(JSON.stringify(s.Resource)).toMatch(/\/(runs|locks)\/\*"/);
    const writes = jobRoleStatements(template).filter((s) => actions(s).includes("s3:PutObject"));
    const prefixes = writes.flatMap((s) => [...JSON.stringify(s.Resource).matchAll(/\/(\w+)\/\*"/g)].map((m) => m[1]));
    expect(prefixes.sort()).toEqual(["bases", "cache", "locks", "models", "runs", "status"]);
    // Listing without a prefix condition: S3 answers 404 (not 403) for a missing key only to a caller that may list.
    const list = jobRoleStatements(template).find((s) => actions(s).includes("s3:ListBucket"));
    expect(list?.Condition).toBeUndefined();
  });

  it("gives the job read-only access to datasets and no delete there; only reviewed captures may be added", () => {
    const datasetStatements = statements().filter((s) => s.Effect === "Allow" && JSON.stringify(s.Resource).includes("/datasets/"));
    expect(datasetStatements.length).toBeGreaterThan(0);
    for (const s of datasetStatements) {
      // The one write under datasets/: the dispatcher adding reviewed captures as captured-* files.
      const captured = JSON.stringify(s.Resource).includes("/datasets/*/captured-*");
      for (const a of actions(s)) expect(a).toMatch(captured ? /^s3:(PutObject|AbortMultipartUpload)$/ : /^s3:GetObject$/);
      if (captured) expect(JSON.stringify(s.Resource)).not.toMatch(/\/datasets\/\*"/);
    }
  });
});

describe("triggers", () => {
  it("submits the dispatcher when a dataset manifest is created, with the key as parameter", () => {
    template.hasResourceProperties("AWS::Events::Rule", {
      EventPattern: { source: ["aws.s3"], "detail-type": ["Object Created"], detail: { object: { key: [{ wildcard: "datasets/*/manifest.json" }] } } },
      Targets: [
        Match.objectLike({
          Arn: { "Fn::GetAtt": [Match.stringLikeRegexp("^TrainingCpuQueue"), "JobQueueArn"] },
          // The dispatcher (which routes to the CPU or GPU queue), not a training definition.
          BatchParameters: Match.objectLike({ JobName: "edgetune-dataset-complete", JobDefinition: { Ref: Match.stringLikeRegexp("^TrainingNightly") } }),
          InputTransformer: Match.objectLike({ InputPathsMap: { "detail-object-key": "$.detail.object.key" } }),
        }),
      ],
    });
  });

  it("submits the same dispatcher when the console writes a request, with its key as parameter (not for the outcomes it writes back)", () => {
    template.hasResourceProperties("AWS::Events::Rule", {
      EventPattern: {
        source: ["aws.s3"],
        "detail-type": ["Object Created"],
        // Larger than any request the worker writes: dropped before it starts a job.
        detail: { object: { key: [{ wildcard: "captures/*/requests/*.json" }], size: [{ numeric: ["<=", 4096] }] } },
      },
      Targets: [
        Match.objectLike({
          Arn: { "Fn::GetAtt": [Match.stringLikeRegexp("^TrainingCpuQueue"), "JobQueueArn"] },
          BatchParameters: Match.objectLike({ JobName: "edgetune-console-request", JobDefinition: { Ref: Match.stringLikeRegexp("^TrainingNightly") } }),
          InputTransformer: Match.objectLike({ InputPathsMap: { "detail-object-key": "$.detail.object.key" } }),
          RetryPolicy: Match.objectLike({ MaximumRetryAttempts: 3 }),
          DeadLetterConfig: Match.anyValue(),
        }),
      ],
    });
    const rules = JSON.stringify(template.findResources("AWS::Events::Rule"));
    expect(rules).not.toContain("captures/*/outcomes");
  });

  it("nightly, submits a small CPU job that submits one training job per changed dataset", () => {
    template.hasResourceProperties("AWS::Scheduler::Schedule", {
      ScheduleExpression: "cron(0 3 * * ? *)",
      ScheduleExpressionTimezone: "Europe/Paris",
    });
    const schedule = JSON.stringify(Object.values(template.findResources("AWS::Scheduler::Schedule"))[0]);
    expect(schedule).toContain(":scheduler:::aws-sdk:batch:submitJob");
    const defs = template.findResources("AWS::Batch::JobDefinition");
    const [nightlyId, nightly] = Object.entries(defs).find(([, d]) => JSON.stringify(d).includes('"EDGETUNE_DISPATCH"')) ?? [];
    expect(schedule).toContain(nightlyId as string);
    const props = JSON.stringify(nightly);
    expect(props).not.toContain('"GPU"');
    expect(props).toContain('"Parameters":{"dataset":"*"}');
    for (const v of ["EDGETUNE_TRAIN_JOB_DEFINITION", "EDGETUNE_JOB_QUEUE", "EDGETUNE_CPU_TRAIN_JOB_DEFINITION", "EDGETUNE_CPU_JOB_QUEUE"])
      expect(props).toContain(v);
    expect(JSON.stringify(nightly?.Properties)).toContain(`"PlatformCapabilities":["FARGATE"]`);
  });

  it("runs the nightly dispatcher on a CPU queue (Fargate Spot first) with a role that cannot write models or the cache", () => {
    const queues = template.findResources("AWS::Batch::JobQueue");
    const envs = template.findResources("AWS::Batch::ComputeEnvironment");
    const idOf = (ref: unknown) => (ref as { Ref?: string }).Ref ?? (ref as { "Fn::GetAtt": string[] })["Fn::GetAtt"][0];
    const typeOf = (ref: unknown) => (envs[idOf(ref) as string] as { Properties: { ComputeResources: { Type: string } } }).Properties.ComputeResources.Type;
    const cpu = Object.entries(queues).find(([id]) => id.startsWith("TrainingCpuQueue"));
    expect(cpu).toBeDefined();
    const [cpuId, cpuQueue] = cpu as [string, { Properties: { ComputeEnvironmentOrder: { Order: number; ComputeEnvironment: unknown }[] } }];
    const order = cpuQueue.Properties.ComputeEnvironmentOrder;
    expect(order.sort((a, b) => a.Order - b.Order).map((o) => typeOf(o.ComputeEnvironment))).toEqual(["FARGATE_SPOT", "FARGATE"]);
    // The schedule submits to the CPU queue, never to the GPU one.
    const schedule = JSON.stringify(Object.values(template.findResources("AWS::Scheduler::Schedule"))[0]);
    expect(schedule).toContain(cpuId);
    expect(schedule).not.toMatch(/"TrainingQueue[0-9A-F]+"/);
    const nightly = jobRoleStatements(template, "TrainingNightlyRole");
    const text = JSON.stringify(nightly);
    expect(text).toContain("batch:SubmitJob");
    // Console review decisions are applied only if signed with an operator's key: the dispatcher gets those keys.
    template.hasResourceProperties("AWS::Batch::JobDefinition", {
      ContainerProperties: Match.objectLike({
        Secrets: [{ Name: "EDGETUNE_CONSOLE_KEYS", ValueFrom: { Ref: Match.stringLikeRegexp("^EdgeConsoleKeys") } }],
        Environment: Match.arrayWith([{ Name: "EDGETUNE_DISPATCH", Value: "1" }]),
      }),
    });
    // Deletes only what the traffic loop reviewed or rolled up, under captures/.
    const deletes = nightly.filter((st) => st.Effect === "Allow" && actions(st).some((a) => a.startsWith("s3:DeleteObject")));
    expect(JSON.stringify(deletes)).toContain("/captures/*");
    expect(JSON.stringify(deletes)).not.toMatch(/\/(models|cache|datasets|bases|runs|status)\//);
    const puts = nightly.filter((st) => st.Effect === "Allow" && actions(st).some((a) => a.startsWith("s3:PutObject")));
    expect(JSON.stringify(puts)).toContain("/bases/*");
    // status/: it closes the upload's record of a finetune run it cannot submit (no GPU path, no quota).
    expect(JSON.stringify(puts)).not.toMatch(/\/(cache|runs)\//);
    // Console requests: under models/ only the pointer (rollback, promote) and a version's export, never its files.
    expect(
      JSON.stringify(puts)
        .match(/\/models\/[^"]*/g)
        ?.sort(),
    ).toEqual(["/models/*/current.json", "/models/*/export/*"]);
    expect(JSON.stringify(puts)).toContain("/requests/*");
    expect(JSON.stringify(puts).match(/\/datasets\/[^"]*/g)).toEqual(["/datasets/*/captured-*"]);
    // Its locks/* grant (a model's lock, for rollbacks) must not reach the push locks under locks/datasets/.
    const denied = nightly.filter((st) => st.Effect === "Deny");
    expect(denied).toEqual([expect.objectContaining({ Action: ["s3:PutObject", "s3:DeleteObject"] })]);
    expect(JSON.stringify(denied[0]?.Resource)).toContain('"/locks/datasets/*"');
  });
});

describe("triggers that cannot submit", () => {
  it("send what they could not deliver to a dead-letter queue, which raises an alarm on the failure topic", () => {
    const [dlq] = Object.keys(template.findResources("AWS::SQS::Queue"));
    const arn = { "Fn::GetAtt": [dlq, "Arn"] };
    template.hasResourceProperties("AWS::Events::Rule", {
      EventPattern: Match.objectLike({ source: ["aws.s3"] }),
      Targets: [Match.objectLike({ DeadLetterConfig: { Arn: arn }, RetryPolicy: Match.objectLike({ MaximumRetryAttempts: 3 }) })],
    });
    template.hasResourceProperties("AWS::Scheduler::Schedule", { Target: Match.objectLike({ DeadLetterConfig: { Arn: arn } }) });
    template.hasResourceProperties("AWS::CloudWatch::Alarm", {
      MetricName: "NumberOfMessagesSent",
      Statistic: "Sum",
      Threshold: 1,
      AlarmActions: [{ Ref: Match.stringLikeRegexp("^AlertsFailures") }],
    });
  });
});

describe("alerts and edge credentials", () => {
  it("notifies failed jobs on an encrypted topic with an e-mail subscription", () => {
    template.hasResourceProperties("AWS::Events::Rule", { EventPattern: { source: ["aws.batch"], detail: { status: ["FAILED"] } } });
    template.hasResourceProperties("AWS::SNS::Topic", { KmsMasterKeyId: Match.anyValue() });
    template.hasResourceProperties("AWS::SNS::Subscription", { Protocol: "email", Endpoint: "ops@example.com" });
    template.hasResourceProperties("AWS::Logs::LogGroup", { RetentionInDays: 30 });
  });

  it("gives the edge reads of models/* and captures/*, writes to captures/* only, their listings, its key in Secrets Manager, exported", () => {
    const objects = (prefix: string) => ({ "Fn::Join": ["", [Match.anyValue(), `/${prefix}`]] });
    template.hasResourceProperties("AWS::IAM::ManagedPolicy", {
      PolicyDocument: {
        Statement: [
          { Effect: "Allow", Action: "s3:GetObject", Resource: [objects("models/*"), objects("captures/*")] },
          { Sid: "WriteCapturesOnly", Effect: "Allow", Action: "s3:PutObject", Resource: objects("captures/*") },
          {
            Effect: "Allow",
            Action: "s3:ListBucket",
            Resource: Match.anyValue(),
            Condition: { StringLike: { "s3:prefix": ["models/", "models/*", "captures/", "captures/*"] } },
          },
        ],
      },
    });
    template.resourceCountIs("AWS::IAM::User", 1);
    template.resourceCountIs("AWS::SecretsManager::Secret", 3); // the edge's key, the API keys, the operators' console keys
    const outputs = Object.keys(template.findOutputs("*"));
    expect(outputs).toEqual(expect.arrayContaining(["BucketName", "Region", "EdgeCredentialsSecretArn"]));
  });

  it("lets the edge's user change nothing outside captures/ (every action but reads and listings, on any policy it has)", () => {
    const userId = Object.keys(template.findResources("AWS::IAM::User"))[0] as string;
    // Every policy that can reach the user: managed ones attached to it, inline ones naming it.
    const users = template.findResources("AWS::IAM::User");
    const attachedRefs = JSON.stringify((users[userId] as { Properties: { ManagedPolicyArns?: unknown } }).Properties.ManagedPolicyArns ?? []);
    const managed = Object.entries(template.findResources("AWS::IAM::ManagedPolicy"))
      .filter(
        ([id, p]) =>
          attachedRefs.includes(`"${id}"`) || JSON.stringify((p as { Properties: { Users?: unknown } }).Properties.Users ?? []).includes(`"${userId}"`),
      )
      .map(([, p]) => p);
    const inline = Object.values(template.findResources("AWS::IAM::Policy")).filter((p) =>
      JSON.stringify((p as { Properties: { Users?: unknown } }).Properties.Users ?? []).includes(`"${userId}"`),
    );
    const edgePolicies = [...managed, ...inline];
    expect(edgePolicies.length).toBeGreaterThan(0);
    type Statement = { Action: string | string[]; Resource: unknown; Effect: string };
    const statements = edgePolicies.flatMap((p) => (p as { Properties: { PolicyDocument: { Statement: Statement[] } } }).Properties.PolicyDocument.Statement);
    const writes = statements.filter((st) => st.Effect === "Allow" && [st.Action].flat().some((a) => !/^s3:(Get|List)/.test(a)));
    expect(writes.length).toBe(1);
    for (const st of writes) {
      expect([st.Action].flat()).toEqual(["s3:PutObject"]);
      const resources = JSON.stringify(st.Resource);
      expect(resources).toMatch(/\/captures\/\*"/);
      expect(resources).not.toMatch(/models|datasets|bases|cache|runs|status|locks/);
    }
  });

  it("generates the Worker's API keys once, in Secrets Manager, as bearer-token characters", () => {
    template.hasResourceProperties("AWS::SecretsManager::Secret", {
      GenerateSecretString: { PasswordLength: 40, ExcludePunctuation: true, IncludeSpace: false },
    });
    expect(Object.keys(template.findOutputs("*"))).toEqual(expect.arrayContaining(["ApiKeysSecretArn", "ConsoleKeysSecretArn"]));
  });
});

describe("cdk-nag", () => {
  it("reports no unacknowledged AwsSolutions finding", () => {
    expect(Annotations.fromStack(stack).findError("*", Match.stringLikeRegexp("AwsSolutions"))).toEqual([]);
    expect(Annotations.fromStack(gpuStack).findError("*", Match.stringLikeRegexp("AwsSolutions"))).toEqual([]);
  });

  it("fails synth for a deliberately bad change (a public bucket)", () => {
    const { app, stack: bad } = buildApp({});
    new s3.Bucket(bad, "Oops", { publicReadAccess: true, blockPublicAccess: s3.BlockPublicAccess.BLOCK_ACLS_ONLY });
    expect(() => app.synth()).toThrow(/AwsSolutions-S(1|2|10)/);
  });

  it("rejects invalid settings with the field named", () => {
    expect(() => buildApp({ edgetune: { instanceTypes: [] } })).toThrow(/instanceTypes/);
    // g5 (A10G, sm_86): no native libtensorflow 2.9.1 kernels, a JIT compile of 30+ minutes in every container.
    expect(() => buildApp({ edgetune: { instanceTypes: ["g4dn.xlarge", "g5.xlarge"] } })).toThrow(/instanceTypes.*only g4dn/);
    // A base image by tag alone is what broke (NVIDIA deletes old CUDA tags): only a digest is accepted.
    expect(() => buildApp({ edgetune: { gpuBaseImage: "nvidia/cuda:11.2.2-cudnn8-runtime-ubuntu20.04" } })).toThrow(/gpuBaseImage.*digest/);
    expect(() => buildApp({ edgetune: { alarmEmail: "not-an-email" } })).toThrow(/alarmEmail/);
    // Fargate pairs 16 vCPU with 32–120 GiB; a queue smaller than one job would run nothing.
    expect(() => buildApp({ edgetune: { cpuJobVcpus: 16 } })).toThrow(/cpuJobMemoryGiB.*16 vCPU with 32–120 GiB/);
    expect(() => buildApp({ edgetune: { cpuJobVcpus: 8, cpuJobMemoryGiB: 32, cpuMaxVcpus: 4 } })).toThrow(/cpuMaxVcpus/);
  });
});

void Stack;

describe("two stacks, deployable apart", () => {
  it("the core references nothing of the GPU stack; the GPU stack imports only the core's exports", () => {
    expect(JSON.stringify(template.toJSON())).not.toContain("Fn::ImportValue");
    const imports = [...JSON.stringify(gpuTemplate.toJSON()).matchAll(/"Fn::ImportValue":"([^"]+)"/g)].map((m) => m[1] as string);
    expect(imports.length).toBeGreaterThan(0);
    for (const name of imports) expect(name).toMatch(/^Edgetune:/);
    expect(gpuStack.dependencies.map((d) => d.stackName)).toEqual(["Edgetune"]);
    expect(stack.dependencies).toEqual([]);
  });

  it("builds the GPU image from the configured base pinned by digest, and the core's image without it", () => {
    const assembly = buildApp({ edgetune: { gpuBaseImage: digest } }).app.synth();
    const manifest = (name: string) =>
      JSON.parse(readFileSync(`${assembly.directory}/${name}.assets.json`, "utf8")) as {
        dockerImages: Record<string, { source: { dockerFile?: string; dockerBuildArgs?: Record<string, string> } }>;
      };
    const [gpuImage] = Object.values(manifest("EdgetuneGpu").dockerImages);
    expect(gpuImage?.source).toMatchObject({ dockerFile: "jobs/train/Dockerfile", dockerBuildArgs: { CUDA_BASE_IMAGE: digest } });
    const [cpuImage] = Object.values(manifest("Edgetune").dockerImages);
    expect(cpuImage?.source.dockerBuildArgs).toBeUndefined();
  });

  it("the core can be updated under a deployed GPU stack: no value the GPU stack imports changes with the training images", () => {
    // CloudFormation refuses to change an export another stack imports. A job definition's Ref is its ARN
    // with the revision, and every image change registers a new revision: so no import may name a
    // resource whose properties change with the image. Two synths that differ only in the images' content
    // (extraHash stands for changed sources) must agree on every resource an import reaches.
    const synthWith = (extraHash?: string) => {
      const fromAsset = ecs.ContainerImage.fromAsset;
      const spy = vi
        .spyOn(ecs.ContainerImage, "fromAsset")
        .mockImplementation((dir, options) => fromAsset.call(ecs.ContainerImage, dir, { ...options, extraHash }));
      try {
        const built = buildApp({ edgetune: { gpuBaseImage: digest } });
        return { core: Template.fromStack(built.stack).toJSON(), gpu: Template.fromStack(built.gpu).toJSON() };
      } finally {
        spy.mockRestore();
      }
    };
    const before = synthWith("sources-before");
    const after = synthWith("sources-after");
    type Out = { Value: unknown; Export?: { Name: string } };
    const resourcesOf = (t: Record<string, unknown>) => t.Resources as Record<string, { Properties?: unknown }>;
    const outputs = Object.values((before.core.Outputs ?? {}) as Record<string, Out>);
    const imported = [...JSON.stringify(before.gpu).matchAll(/"Fn::ImportValue":"([^"]+)"/g)].map((m) => m[1] as string);
    expect(imported.length).toBeGreaterThan(0);
    // The images did change between the two synths (else this test would prove nothing).
    expect(JSON.stringify(resourcesOf(before.core))).not.toBe(JSON.stringify(resourcesOf(after.core)));
    for (const name of imported) {
      const output = outputs.find((o) => o.Export?.Name === name);
      expect(output, name).toBeDefined();
      const referenced = [...JSON.stringify(output?.Value).matchAll(/"(?:Ref|Fn::GetAtt)":\[?"([A-Za-z0-9]+)"/g)].map((m) => m[1] as string);
      for (const id of referenced) {
        expect(JSON.stringify(resourcesOf(after.core)[id]), `${name} → ${id}`).toBe(JSON.stringify(resourcesOf(before.core)[id]));
        expect(resourcesOf(before.core)[id], `${name} → ${id}`).not.toMatchObject({ Type: "AWS::Batch::JobDefinition" });
      }
    }
  });

  it("tells the dispatcher the GPU path by name (it may not exist yet), with the job's vCPUs for the quota check", () => {
    const nightly = Object.values(template.findResources("AWS::Batch::JobDefinition")).find((d) => JSON.stringify(d).includes('"EDGETUNE_DISPATCH"'));
    const env = Object.fromEntries(
      (nightly as { Properties: { ContainerProperties: { Environment: { Name: string; Value: unknown }[] } } }).Properties.ContainerProperties.Environment.map(
        (e) => [e.Name, e.Value],
      ),
    );
    expect(env).toMatchObject({ EDGETUNE_JOB_QUEUE: "Edgetune-finetune", EDGETUNE_TRAIN_JOB_DEFINITION: "Edgetune-finetune", EDGETUNE_GPU_JOB_VCPUS: "4" });
  });
});

describe("least privilege", () => {
  it("gives no role s3:List*, s3:GetBucket* or a whole-bucket grant beyond ListBucket, which only the job, dispatcher and failure records hold without a prefix", () => {
    for (const t of [template, gpuTemplate]) {
      for (const type of ["AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"]) {
        for (const [id, p] of Object.entries(t.findResources(type))) {
          const doc = (p.Properties as { PolicyDocument: { Statement: Statement[] } }).PolicyDocument;
          for (const st of doc.Statement) {
            for (const a of actions(st)) expect(a).not.toMatch(/^s3:(List\*|GetBucket|ListBucketVersions|ListBucketMultipartUploads|\*)/);
            if (!actions(st).includes("s3:ListBucket")) continue;
            // Unconditional listing: the job, the dispatcher and the failure-records Lambda only (S3 answers 404, not 403, for a missing key only to a lister).
            if (st.Condition === undefined) expect(id).toMatch(/^(Training(JobRole|NightlyRole)|FailureRecordsHandlerServiceRole)/);
          }
        }
      }
    }
  });
});

describe("alerts that arrive", () => {
  it("lets CloudWatch publish to the topic, bound to the alarms by source ARN, besides EventBridge", () => {
    const alarmIds = Object.keys(template.findResources("AWS::CloudWatch::Alarm"));
    template.hasResourceProperties("AWS::SNS::TopicPolicy", {
      PolicyDocument: {
        Statement: Match.arrayWith([
          Match.objectLike({ Effect: "Allow", Principal: { Service: "events.amazonaws.com" }, Action: "sns:Publish" }),
          Match.objectLike({
            Sid: "CloudWatchAlarmsPublish",
            Effect: "Allow",
            Principal: { Service: "cloudwatch.amazonaws.com" },
            Action: "sns:Publish",
            // Every alarm of the stack (undelivered triggers, failure-records errors), and nothing else.
            Condition: { ArnEquals: { "aws:SourceArn": alarmIds.map((id) => ({ "Fn::GetAtt": [id, "Arn"] })) } },
          }),
        ]),
      },
    });
    // The topic's key lets CloudWatch encrypt what it publishes.
    template.hasResourceProperties("AWS::KMS::Key", {
      KeyPolicy: { Statement: Match.arrayWith([Match.objectLike({ Principal: { Service: "cloudwatch.amazonaws.com" } })]) },
    });
  });
});

describe("infrastructure failures reach the status record", () => {
  it("sends every FAILED job of both queues to a Lambda that writes status/ only, with retries and the dead-letter queue", () => {
    const [fnId] = Object.keys(template.findResources("AWS::Lambda::Function", { Properties: { Runtime: "nodejs24.x" } }));
    expect(fnId).toMatch(/^FailureRecordsHandler/);
    const [dlq] = Object.keys(template.findResources("AWS::SQS::Queue"));
    const rules = Object.values(template.findResources("AWS::Events::Rule")).filter((r) => JSON.stringify(r).includes(`"${fnId}"`));
    expect(rules).toHaveLength(1);
    const rule = rules[0] as { Properties: { EventPattern: { detail: { status: string[]; jobQueue: unknown[] } }; Targets: unknown[] } };
    expect(rule.Properties.EventPattern).toMatchObject({ source: ["aws.batch"], "detail-type": ["Batch Job State Change"], detail: { status: ["FAILED"] } });
    const queues = JSON.stringify(rule.Properties.EventPattern.detail.jobQueue);
    expect(queues).toContain(":job-queue/Edgetune-finetune");
    expect(queues).toContain("TrainingCpuQueue");
    expect(rule.Properties.Targets).toEqual([
      expect.objectContaining({ DeadLetterConfig: { Arn: { "Fn::GetAtt": [dlq, "Arn"] } }, RetryPolicy: expect.objectContaining({ MaximumRetryAttempts: 3 }) }),
    ]);
    const fnRole = (template.findResources("AWS::Lambda::Function")[fnId as string] as { Properties: { Role: { "Fn::GetAtt": string[] } } }).Properties.Role[
      "Fn::GetAtt"
    ][0];
    const own = jobRoleStatements(template, fnRole as string).filter((st) => actions(st).some((a) => a.startsWith("s3:")));
    const grants = Object.fromEntries(own.map((st) => [actions(st).join(","), JSON.stringify(st.Resource)]));
    expect(Object.keys(grants).sort()).toEqual(["s3:GetObject,s3:DeleteObject", "s3:GetObject,s3:PutObject", "s3:ListBucket"]);
    expect(grants["s3:GetObject,s3:PutObject"]).toMatch(/"\/status\/\*"\]\]\}$/); // writes status records only
    expect(grants["s3:GetObject,s3:DeleteObject"]).toMatch(/"\/locks\/\*"\]\]\}$/); // deletes the dead job's locks only
    expect(JSON.stringify(own)).not.toMatch(/\/(datasets|models|cache|bases|captures|runs)\//);
    // Listing without a prefix condition: with one, S3 answers the claim's check for a missing key (putIfAbsent) with 403, not 404.
    const list = own.find((st) => actions(st).includes("s3:ListBucket"));
    expect(list).toBeDefined();
    expect(list?.Condition).toBeUndefined();
  });

  it("does not lose an event the Lambda failed on: after its retries it goes to the dead-letter queue, and its errors raise an alarm on the topic", () => {
    const [fnId] = Object.keys(template.findResources("AWS::Lambda::Function", { Properties: { Runtime: "nodejs24.x" } }));
    const [dlq] = Object.keys(template.findResources("AWS::SQS::Queue"));
    template.hasResourceProperties("AWS::Lambda::EventInvokeConfig", {
      FunctionName: { Ref: fnId },
      MaximumRetryAttempts: 2,
      DestinationConfig: { OnFailure: { Destination: { "Fn::GetAtt": [dlq, "Arn"] } } },
    });
    // Which raises the dead-letter alarm; the Lambda may send there.
    const fnRole = (template.findResources("AWS::Lambda::Function")[fnId as string] as { Properties: { Role: { "Fn::GetAtt": string[] } } }).Properties.Role[
      "Fn::GetAtt"
    ][0];
    expect(
      jobRoleStatements(template, fnRole as string).some(
        (st) => actions(st).includes("sqs:SendMessage") && JSON.stringify(st.Resource).includes(dlq as string),
      ),
    ).toBe(true);
    const [topic] = Object.keys(template.findResources("AWS::SNS::Topic"));
    const errors = Object.entries(template.findResources("AWS::CloudWatch::Alarm")).filter(
      ([, a]) => JSON.stringify(a).includes('"MetricName":"Errors"') && JSON.stringify(a).includes(`"Ref":"${fnId}"`),
    );
    expect(errors).toHaveLength(1);
    const [errorsId, alarm] = errors[0] as [string, { Properties: { AlarmActions: unknown[]; Threshold: number } }];
    expect(alarm.Properties).toMatchObject({ AlarmActions: [{ Ref: topic }], Threshold: 1 });
    // The topic lets this alarm publish too.
    template.hasResourceProperties("AWS::SNS::TopicPolicy", {
      PolicyDocument: {
        Statement: Match.arrayWith([
          Match.objectLike({
            Sid: "CloudWatchAlarmsPublish",
            Condition: { ArnEquals: { "aws:SourceArn": Match.arrayWith([{ "Fn::GetAtt": [errorsId, "Arn"] }]) } },
          }),
        ]),
      },
    });
  });
});

describe("npm run synth", () => {
  it("synthesizes offline and stages the training image's build context without node_modules", async () => {
    const { spawnSync } = await import("node:child_process");
    const { mkdtempSync } = await import("node:fs");
    const { tmpdir } = await import("node:os");
    const out = mkdtempSync(join(tmpdir(), "cdk-out-"));
    const r = spawnSync("npx", ["cdk", "synth", "--quiet", "--output", out], { encoding: "utf8", timeout: 120_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(existsSync(join(out, "Edgetune.template.json"))).toBe(true);
    const asset = readdirSync(out).find((d) => d.startsWith("asset.") && existsSync(join(out, d, "package.json")));
    expect(asset).toBeDefined();
    const staged = readdirSync(join(out, asset as string));
    expect(staged).toEqual(expect.arrayContaining(["package.json", "package-lock.json", "jobs", "shared"]));
    expect(staged).not.toContain("node_modules");
    expect(existsSync(join(out, asset as string, "jobs/train/Dockerfile"))).toBe(true);
    expect(existsSync(join(out, asset as string, "jobs/train/Dockerfile.cpu"))).toBe(true);
    // Both images' npm ci skips onnxruntime-node's CUDA download whatever npm the base image has.
    for (const file of ["Dockerfile", "Dockerfile.cpu"])
      expect(readFileSync(join(out, asset as string, "jobs/train", file), "utf8")).toMatch(/^ENV ONNXRUNTIME_NODE_INSTALL=skip$/m);
    expect(existsSync(join(out, asset as string, "jobs/train/bases"))).toBe(false); // no weights in the image: bases come from the bucket or their publisher
    // Built for the GPU hosts (x86) whatever machine runs `cdk deploy`.
    const images = (stackName: string) =>
      Object.values(
        (
          JSON.parse(readFileSync(join(out, `${stackName}.assets.json`), "utf8")) as {
            dockerImages: Record<string, { source: { platform?: string; dockerFile?: string } }>;
          }
        ).dockerImages,
      ).map((i) => `${i.source.dockerFile} ${i.source.platform}`);
    // One image per stack, both for the x86 hosts: the CPU one (Fargate) with the core, the GPU one (EC2) apart.
    expect(images("Edgetune")).toEqual(["jobs/train/Dockerfile.cpu linux/amd64"]);
    expect(images("EdgetuneGpu")).toEqual(["jobs/train/Dockerfile linux/amd64"]);
    // The failure-records Lambda as bundled for Lambda (CommonJS, the AWS SDK inside), run on a real S3 API server.
    const bundle = readdirSync(out).find((d) => d.startsWith("asset.") && existsSync(join(out, d, "index.js")));
    expect(bundle).toBeDefined();
    const cjs = join(out, "job-failed.cjs"); // the repository's package.json says "module"; Lambda's folder says nothing
    copyFileSync(join(out, bundle as string, "index.js"), cjs);
    const { handler } = createRequire(import.meta.url)(cjs) as { handler: (e: unknown) => Promise<{ failed: string[] }> };
    const s3 = await startLocalS3({ bucket: "bundle" });
    const saved = { ...process.env };
    Object.assign(process.env, {
      EDGETUNE_BUCKET: "bundle",
      EDGETUNE_S3_ENDPOINT: s3.endpoint,
      AWS_ACCESS_KEY_ID: "local",
      AWS_SECRET_ACCESS_KEY: "local-secret",
    });
    try {
      const detail = {
        jobId: "j-1",
        status: "FAILED",
        statusReason: "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY",
        attempts: [],
        parameters: { dataset: "pets" },
        createdAt: 1641944200058,
      };
      expect((await handler({ detail })).failed).toEqual([expect.stringMatching(/^pets\/\d{8}T\d{9}Z-[0-9a-f]{6}$/)]);
      const keys: string[] = [];
      for await (const o of s3.store.list("status/pets/")) keys.push(o.key);
      const [key] = keys;
      expect(JSON.parse(new TextDecoder().decode((await s3.store.get(key as string)) ?? new Uint8Array()))).toMatchObject({
        state: "failed",
        jobId: "j-1",
        reason: expect.stringMatching(/^cancelled while waiting for capacity/),
      });
    } finally {
      process.env = saved;
      await s3.stop();
    }
  }, 180_000);
});
