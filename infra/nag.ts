import { type CfnElement, type Stack, Token, Validations } from "aws-cdk-lib";
import type { IConstruct } from "constructs";
import { embedJobName } from "./constructs/training-batch.ts";

/**
 * cdk-nag AwsSolutions findings accepted on purpose, each on the narrowest construct that needs it
 * and with its reason. Everything else fails `cdk synth` (cdk-nag runs as a validation plugin) and the
 * infra tests.
 */
const ack = (scope: IConstruct, finding: string, reason: string) => Validations.of(scope).acknowledge({ id: `AwsSolutions::${finding}`, reason });

export function acknowledgeNagFindings(stack: Stack): void {
  const training = stack.node.findChild("Training");
  const jobRole = training.node.findChild("JobRole");
  for (const prefix of ["datasets", "bases", "models", "cache", "runs", "locks", "status"]) {
    ack(
      jobRole,
      `AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/${prefix}/*]`,
      `The job reads or writes every object under ${prefix}/ of its own bucket (key layout in shared/keys.ts).`,
    );
  }
  // cdk-nag names the finding with the stack's region and account where they are known.
  const region = Token.isUnresolved(stack.region) ? "<AWS::Region>" : stack.region;
  const account = Token.isUnresolved(stack.account) ? "<AWS::AccountId>" : stack.account;
  const cpuDef = training.node.findChild("TrainCpu").node.defaultChild as CfnElement;
  const cpuName = `{"Fn::Select":[1,{"Fn::Split":["/",{"Fn::Select":[5,{"Fn::Split":[":",{"Ref":"${stack.getLogicalId(cpuDef)}"}]}]}]}]}`;
  ack(
    jobRole,
    `AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:batch:${region}:${account}:job-definition/${cpuName}:*]`,
    "Every revision of the TrainCpu definition: a fanned-out run submits its continuation at the revision it started with, which a redeploy may have superseded.",
  );
  const gpuDefinitions = `AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:batch:${region}:${account}:job-definition/${stack.stackName}-finetune:*]`;
  ack(
    jobRole,
    gpuDefinitions,
    "Every revision of the GPU stack's Train definition (fixed name): a fanned-out fine-tuning run submits its continuation at the revision it started with.",
  );
  ack(
    jobRole,
    `AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:batch:${region}:${account}:job-definition/${embedJobName(stack.stackName)}:*]`,
    "Every revision of the Embed definition (fixed name): a fanned-out run submits its children by name, the latest revision, so no stack has to import an ARN that changes with each image.",
  );
  ack(
    jobRole,
    "AwsSolutions-IAM5[Resource::*]",
    "batch:DescribeJobs has no resource-level permissions; the train job uses it only to watch the Embed array job it submitted.",
  );
  const nightlyRole = training.node.findChild("NightlyRole");
  for (const prefix of ["datasets", "models", "bases"]) {
    ack(
      nightlyRole,
      `AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/${prefix}/*]`,
      `The nightly dispatcher plans every dataset: it reads ${prefix}/ (and may store a base it plans with under bases/).`,
    );
  }
  ack(
    nightlyRole,
    "AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/captures/*]",
    "The nightly step of the traffic loop reads the edge's captures and counters, writes their roll-ups and deletes what was reviewed.",
  );
  ack(
    nightlyRole,
    "AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/datasets/*/captured-*]",
    "Reviewed captures join their dataset as captured-* files: the only keys under datasets/ the dispatcher may write.",
  );
  ack(
    nightlyRole,
    "AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/status/*]",
    "A finetune run the dispatcher cannot submit (no GPU path, no G quota) is closed in its upload's status record.",
  );
  // Console requests (jobs/train/src/requests/): the dispatcher applies them with these, the worker never.
  ack(
    nightlyRole,
    "AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/models/*/current.json]",
    "A console rollback or promotion (a signed request) moves a model's pointer, as edgetune rollback does; never a version's files.",
  );
  ack(
    nightlyRole,
    "AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/models/*/export/*]",
    "A console export (a signed request) stores the version's ONNX file and its description under models/<name>/<version>/export/.",
  );
  ack(
    nightlyRole,
    "AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/locks/*]",
    "A console rollback takes the model's lock when it is free, as edgetune rollback does (read, write, delete of locks/<model>.json).",
  );
  ack(
    nightlyRole,
    "AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/requests/*]",
    "Each console request is claimed once under requests/<model>/<id>.json, where the edge's key cannot write: a replayed request is refused.",
  );
  ack(
    nightlyRole,
    gpuDefinitions,
    "The dispatcher submits fine-tuning by the GPU stack's fixed definition name (the latest revision): the GPU stack may be deployed after the core, or not at all.",
  );
  ack(
    nightlyRole,
    "AwsSolutions-IAM5[Resource::*]",
    "batch:DescribeJobQueues (is the GPU path deployed?) and servicequotas:GetServiceQuota / GetAWSDefaultServiceQuota (does a fine-tuning job fit the G quota?) have no resource-level permissions.",
  );
  for (const id of ["EmbedContainer", "CpuContainer", "NightlyContainer"]) {
    ack(
      training.node.findChild(id),
      "AwsSolutions-IAM5[Resource::*]",
      "ecr:GetAuthorizationToken has no resource-level permissions; the image pull itself is limited to the asset repository.",
    );
  }
  ack(
    stack,
    "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole]",
    "CDK's own BucketNotificationsHandler (turns on EventBridge notifications) and the failure-records Lambda only write their logs with it.",
  );
  ack(
    stack.node.findChild("FailureRecords").node.findChild("Handler"),
    "AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/status/*]",
    "The failure-records Lambda reads and writes run status records (status/<dataset>/<run>.json).",
  );
  ack(
    stack.node.findChild("FailureRecords").node.findChild("Handler"),
    "AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/locks/*]",
    "The failure-records Lambda frees the model locks a failed job still holds (locks/<model>.json owned by that job), and nothing else.",
  );
  ack(
    stack.node.findChild("Triggers").node.findChild("DeadLetters"),
    "AwsSolutions-SQS3",
    "This queue is the dead-letter queue of the training triggers and the failure records (EventBridge rule and schedule targets); it is alarmed on, not drained.",
  );
  const edge = stack.node.findChild("Edge");
  ack(
    edge.node.findChild("ReadModels"),
    "AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/models/*]",
    "The edge reads any promoted model: s3:GetObject on models/* only, nothing else.",
  );
  ack(
    edge.node.findChild("ReadModels"),
    "AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/captures/*]",
    "The traffic loop: the edge stores captured inputs and counters under captures/ (PutObject and GetObject there only; no delete, nothing outside captures/).",
  );
  ack(
    edge.node.findChild("ApiKeys"),
    "AwsSolutions-SMG4",
    "Clients hold these keys: rotation is an operator's explicit step (npm run deploy -- --rotate-api-key keeps the previous key valid for one more rotation), not a schedule.",
  );
  ack(
    edge.node.findChild("ConsoleKeys"),
    "AwsSolutions-SMG4",
    "Operators type these keys into the web console; they live in Worker secrets, so a new value takes a deploy (npm run deploy), not a schedule.",
  );
  ack(
    edge.node.findChild("Secret"),
    "AwsSolutions-SMG4",
    "The key must be copied into Cloudflare Worker secrets, so it cannot rotate automatically; rotate by replacing the key and running npm run deploy (infra/README.md).",
  );
}

/** The GPU stack's accepted findings. */
export function acknowledgeGpuNagFindings(stack: Stack): void {
  const gpu = stack.node.findChild("Gpu");
  ack(
    gpu.node.findChild("Container"),
    "AwsSolutions-IAM5[Resource::*]",
    "ecr:GetAuthorizationToken has no resource-level permissions; the image pull itself is limited to the asset repository.",
  );
  for (const ce of ["Spot", "OnDemand"]) {
    const node = gpu.node.tryFindChild(ce);
    if (node) {
      ack(
        node,
        "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role]",
        "The ECS container-instance role AWS documents for Batch managed EC2 compute environments.",
      );
    }
  }
}
