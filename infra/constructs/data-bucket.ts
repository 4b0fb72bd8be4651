import { Duration, RemovalPolicy } from "aws-cdk-lib";
import * as s3 from "aws-cdk-lib/aws-s3";
import { Construct } from "constructs";
import type { EdgetuneConfig } from "../config.ts";

/**
 * The one bucket for datasets, bases, models and the embedding cache (key layout: shared/keys.ts).
 * Encrypted (SSE-S3, so ETags stay content MD5s, which the embedding cache keys on), versioned,
 * TLS only, never public, with EventBridge notifications for the "dataset complete" trigger, and
 * lifecycle rules so nothing grows without bound. Server access logs go to a second bucket.
 */
export class DataBucket extends Construct {
  readonly bucket: s3.Bucket;

  constructor(scope: Construct, id: string, config: EdgetuneConfig) {
    super(scope, id);
    const logs = new s3.Bucket(this, "AccessLogs", {
      encryption: s3.BucketEncryption.S3_MANAGED,
      blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
      enforceSSL: true,
      objectOwnership: s3.ObjectOwnership.BUCKET_OWNER_PREFERRED,
      lifecycleRules: [{ expiration: Duration.days(90) }],
      removalPolicy: RemovalPolicy.RETAIN,
    });
    this.bucket = new s3.Bucket(this, "Data", {
      bucketName: config.bucketName,
      encryption: s3.BucketEncryption.S3_MANAGED,
      blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
      enforceSSL: true,
      versioned: true,
      eventBridgeEnabled: true,
      serverAccessLogsBucket: logs,
      serverAccessLogsPrefix: "data/",
      removalPolicy: RemovalPolicy.RETAIN,
      lifecycleRules: [
        { id: "abort-incomplete-multipart", abortIncompleteMultipartUploadAfter: Duration.days(2) },
        { id: "noncurrent-versions", noncurrentVersionExpiration: Duration.days(config.noncurrentVersionRetentionDays) },
        { id: "embedding-cache", prefix: "cache/", expiration: Duration.days(config.embeddingCacheRetentionDays) },
        { id: "run-state", prefix: "runs/", expiration: Duration.days(14) },
        { id: "run-status", prefix: "status/", expiration: Duration.days(30) },
        // What the edge captured for review and counted: personal data, possibly; kept a bounded time,
        // and its overwritten versions (the daily quota is rewritten with every capture) for one day.
        {
          id: "captures",
          prefix: "captures/",
          expiration: Duration.days(config.captureRetentionDays),
          noncurrentVersionExpiration: Duration.days(1),
        },
        // Console requests' claims (jobs/train/src/requests/): a request older than 30 minutes is refused
        // for its age anyway, so a claim needs to outlive that, not to be kept for ever.
        { id: "request-claims", prefix: "requests/", expiration: Duration.days(2) },
        // The training lock's heartbeats (one object version a minute while a run holds it).
        { id: "lock-heartbeats", prefix: "locks/", noncurrentVersionExpiration: Duration.days(1) },
        // No age-based expiry under models/ or datasets/: the promoted version may be old, and
        // expiring it would take the edge's model away. Versions are only written when the data or
        // options change (a nightly run on unchanged data writes nothing), and overwritten pointers
        // age out as noncurrent versions above.
      ],
    });
  }
}
