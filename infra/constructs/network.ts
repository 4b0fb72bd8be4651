import * as ec2 from "aws-cdk-lib/aws-ec2";
import * as logs from "aws-cdk-lib/aws-logs";
import { Construct } from "constructs";

/**
 * Networking for the GPU hosts without a NAT gateway (≈ $32/month idle per AZ): public subnets in two
 * AZs, hosts get a public IP but a security group with no inbound rule, so they can only connect out
 * (to pull the image from ECR). S3 traffic goes through a free gateway endpoint. Flow logs on.
 */
export class BatchNetwork extends Construct {
  readonly vpc: ec2.Vpc;
  readonly securityGroup: ec2.SecurityGroup;

  constructor(scope: Construct, id: string, props: { logRetention: logs.RetentionDays }) {
    super(scope, id);
    this.vpc = new ec2.Vpc(this, "Vpc", {
      maxAzs: 2,
      natGateways: 0,
      subnetConfiguration: [{ name: "public", subnetType: ec2.SubnetType.PUBLIC, cidrMask: 24, mapPublicIpOnLaunch: true }],
      gatewayEndpoints: { S3: { service: ec2.GatewayVpcEndpointAwsService.S3 } },
    });
    this.vpc.addFlowLog("FlowLog", {
      destination: ec2.FlowLogDestination.toCloudWatchLogs(new logs.LogGroup(this, "FlowLogs", { retention: props.logRetention })),
      trafficType: ec2.FlowLogTrafficType.REJECT,
    });
    this.securityGroup = new ec2.SecurityGroup(this, "Hosts", { vpc: this.vpc, description: "edgetune batch hosts: outbound only", allowAllOutbound: true });
  }
}
