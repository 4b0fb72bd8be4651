import { SecretValue } from "aws-cdk-lib";
import * as iam from "aws-cdk-lib/aws-iam";
import type * as s3 from "aws-cdk-lib/aws-s3";
import * as secretsmanager from "aws-cdk-lib/aws-secretsmanager";
import { Construct } from "constructs";

/**
 * Credentials for the Cloudflare Worker, which lives outside AWS and so cannot assume a role: an IAM
 * user allowed s3:GetObject on `models/*` and a listing of `models/` (the web console's model and
 * version lists), and — for the traffic loop — s3:GetObject and s3:PutObject on `captures/*` and its
 * listing. It can write nothing outside `captures/` and delete nothing. Its access key is kept in Secrets Manager
 * (`npm run deploy` copies it into Worker secrets). Rotate by replacing the key and redeploying.
 * Also the API keys clients present to the Worker: generated once by CloudFormation, so every later
 * deploy keeps them; `npm run deploy -- --rotate-api-key` rotates them explicitly.
 */
export class EdgeCredentials extends Construct {
  readonly user: iam.User;
  readonly secret: secretsmanager.Secret;
  readonly apiKeys: secretsmanager.Secret;
  readonly consoleKeys: secretsmanager.Secret;

  constructor(scope: Construct, id: string, props: { bucket: s3.IBucket }) {
    super(scope, id);
    this.user = new iam.User(this, "EdgeReader");
    const policy = new iam.ManagedPolicy(this, "ReadModels", {
      description: "edgetune edge worker: read and list models; read, list and write captures only",
      statements: [
        new iam.PolicyStatement({ actions: ["s3:GetObject"], resources: [props.bucket.arnForObjects("models/*"), props.bucket.arnForObjects("captures/*")] }),
        new iam.PolicyStatement({ sid: "WriteCapturesOnly", actions: ["s3:PutObject"], resources: [props.bucket.arnForObjects("captures/*")] }),
        new iam.PolicyStatement({
          actions: ["s3:ListBucket"],
          resources: [props.bucket.bucketArn],
          conditions: { StringLike: { "s3:prefix": ["models/", "models/*", "captures/", "captures/*"] } },
        }),
      ],
    });
    this.user.addManagedPolicy(policy);
    const key = new iam.AccessKey(this, "Key", { user: this.user });
    this.secret = new secretsmanager.Secret(this, "Secret", {
      description: "edgetune edge worker S3 credentials (read models, write captures)",
      // The key id is not secret; the secret key goes straight from the AccessKey into the secret.
      secretObjectValue: { accessKeyId: SecretValue.unsafePlainText(key.accessKeyId), secretAccessKey: key.secretAccessKey },
    });
    // Comma-separated bearer keys (RFC 6750 token characters: letters and digits only here).
    this.apiKeys = new secretsmanager.Secret(this, "ApiKeys", {
      description: "edgetune edge worker API keys (comma-separated); kept across deploys, rotated by npm run deploy -- --rotate-api-key",
      generateSecretString: { passwordLength: 40, excludePunctuation: true, includeSpace: false },
    });
    // Operators' keys: they also open the web console's listings and reports (CONSOLE_API_KEYS).
    this.consoleKeys = new secretsmanager.Secret(this, "ConsoleKeys", {
      description: "edgetune edge worker operator keys for the web console (comma-separated); kept across deploys",
      generateSecretString: { passwordLength: 40, excludePunctuation: true, includeSpace: false },
    });
  }
}
