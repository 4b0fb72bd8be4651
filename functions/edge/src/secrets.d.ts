/**
 * Worker secrets (`wrangler secret put …`, `.dev.vars` locally). `wrangler types` only sees secrets
 * present in a local .dev.vars, which is never committed, so they are declared here and merged into
 * the generated `Env`.
 */
interface Env {
  /** Comma-separated bearer keys accepted by /v1/* for classifying (clients). */
  API_KEYS: string;
  /**
   * Comma-separated operators' keys: they also open the console's listings (models, versions, reports).
   * Unset: those routes answer 403. (CDK output ConsoleKeysSecretArn.)
   */
  CONSOLE_API_KEYS?: string;
  /** Read-only S3 key limited to models/* (CDK output EdgeCredentialsSecretArn). */
  AWS_ACCESS_KEY_ID: string;
  AWS_SECRET_ACCESS_KEY: string;
}
