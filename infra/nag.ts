import { type CfnElement, type Stack, Token, Validations } from "aws-cdk-lib";
import type { IConstruct } from "constructs";

/**
 * cdk-nag AwsSolutions findings accepted on purpose, each on the narrowest construct that needs it
 * and with its reason. Everything else fails `cdk synth` (cdk-nag runs as a validation plugin) and the
 * infra tests.
 */
const ack = (scope: IConstruct, finding: string, reason: string) => Validations.of(scope).acknowledge({ id: `AwsSolutions::${finding}`, reason });

export function acknowledgeNagFindings(stack: Stack): void {
  const jobRole = stack.node.findChild("Training").node.findChild("JobRole");
  for (const prefix of ["datasets", "bases", "models", "cache", "runs", "locks", "status"]) {
    ack(
      jobRole,
      `AwsSolutions-IAM5[Resource::<Data178AD3D0.Arn>/${prefix}/*]`,
      `The job reads or writes every object under ${prefix}/ of its own bucket (key layout in shared/keys.ts).`,
    );
  }
  for (const action of ["s3:GetObject*", "s3:GetBucket*", "s3:List*", "s3:DeleteObject*", "s3:Abort*"]) {
    ack(jobRole, `AwsSolutions-IAM5[Action::${action}]`, `${action} is the action group CDK's bucket grants use, limited to the prefixes above.`);
  }
  for (const id of ["Train", "TrainCpu"]) {
    const def = stack.node.findChild("Training").node.findChild(id).node.defaultChild as CfnElement;
    const name = `{"Fn::Select":[1,{"Fn::Split":["/",{"Fn::Select":[5,{"Fn::Split":[":",{"Ref":"${stack.getLogicalId(def)}"}]}]}]}]}`;
    // cdk-nag names the finding with the stack's region and account where they are known.
    const region = Token.isUnresolved(stack.region) ? "<AWS::Region>" : stack.region;
    const account = Token.isUnresolved(stack.account) ? "<AWS::AccountId>" : stack.account;
    ack(
      jobRole,
      `AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:batch:${region}:${account}:job-definition/${name}:*]`,
      `Every revision of the ${id} definition: a fanned-out run submits its continuation at the revision it started with, which a redeploy may have superseded.`,
    );
  }
  ack(
    jobRole,
    "AwsSolutions-IAM5[Resource::*]",
    "batch:DescribeJobs has no resource-level permissions; the train job uses it only to watch the Embed array job it submitted.",
  );
  const nightlyRole = stack.node.findChild("Training").node.findChild("NightlyRole");
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
  for (const action of ["s3:GetObject*", "s3:GetBucket*", "s3:List*", "s3:Abort*", "s3:DeleteObject*"]) {
    ack(nightlyRole, `AwsSolutions-IAM5[Action::${action}]`, `${action} is the action group CDK's bucket grants use, limited to the prefixes above.`);
  }
  for (const id of ["Container", "EmbedContainer", "CpuContainer", "NightlyContainer"]) {
    ack(
      stack.node.findChild("Training").node.findChild(id),
      "AwsSolutions-IAM5[Resource::*]",
      "ecr:GetAuthorizationToken has no resource-level permissions; the image pull itself is limited to the asset repository.",
    );
  }
  for (const ce of ["Spot", "OnDemand"]) {
    const node = stack.node.findChild("Training").node.tryFindChild(ce);
    if (node) {
      ack(
        node,
        "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role]",
        "The ECS container-instance role AWS documents for Batch managed EC2 compute environments.",
      );
    }
  }
  ack(
    stack,
    "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole]",
    "CDK's own BucketNotificationsHandler (turns on EventBridge notifications) only writes its logs.",
  );
  ack(
    stack.node.findChild("Triggers").node.findChild("DeadLetters"),
    "AwsSolutions-SQS3",
    "This queue is the dead-letter queue of the training triggers (EventBridge rule and schedule targets); it is alarmed on, not drained.",
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
