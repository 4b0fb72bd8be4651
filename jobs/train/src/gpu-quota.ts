import { GetAWSDefaultServiceQuotaCommand, GetServiceQuotaCommand } from "@aws-sdk/client-service-quotas";

/**
 * The EC2 vCPU quotas for G and VT instances (the GPU hosts), read so that they cannot lie: an account's
 * quota that cannot be read (no permission, throttling, a quota never touched in that region) falls back
 * to AWS's default for it, and only when neither can be read is the value unknown — which is said, never
 * counted as "fits". Used by the deploy's preflight and by the dispatcher before a fine-tuning run.
 */
export const GPU_QUOTAS = {
  spot: { code: "L-3819A6DF", name: "All G and VT Spot Instance Requests" },
  onDemand: { code: "L-DB2E81BA", name: "Running On-Demand G and VT instances" },
} as const;

export interface QuotaClient {
  send(command: GetServiceQuotaCommand | GetAWSDefaultServiceQuotaCommand): Promise<{ Quota?: { Value?: number } }>;
}

export interface QuotaValue {
  value?: number;
  /** Where the value came from: the account's own quota, AWS's default (the account's could not be read), or nowhere. */
  source: "account" | "default" | "unknown";
}

export async function readQuota(client: QuotaClient, code: string): Promise<QuotaValue> {
  const ask = async (command: GetServiceQuotaCommand | GetAWSDefaultServiceQuotaCommand) => {
    const value = (await client.send(command)).Quota?.Value;
    if (value === undefined) throw new Error("no value");
    return value;
  };
  try {
    return { value: await ask(new GetServiceQuotaCommand({ ServiceCode: "ec2", QuotaCode: code })), source: "account" };
  } catch {
    try {
      return { value: await ask(new GetAWSDefaultServiceQuotaCommand({ ServiceCode: "ec2", QuotaCode: code })), source: "default" };
    } catch {
      return { source: "unknown" };
    }
  }
}

export interface GpuQuotas {
  spot: QuotaValue;
  onDemand: QuotaValue;
}

export async function readGpuQuotas(client: QuotaClient, spot: boolean): Promise<GpuQuotas> {
  return {
    spot: spot ? await readQuota(client, GPU_QUOTAS.spot.code) : { value: 0, source: "account" },
    onDemand: await readQuota(client, GPU_QUOTAS.onDemand.code),
  };
}

/** Whether a job of `vcpus` can start under either quota: true, false, or undefined when neither is known. */
export function gpuJobFits(quotas: GpuQuotas, vcpus: number): boolean | undefined {
  const known = [quotas.spot.value, quotas.onDemand.value].filter((v): v is number => v !== undefined);
  if (known.some((v) => v >= vcpus)) return true;
  return quotas.spot.value === undefined || quotas.onDemand.value === undefined ? undefined : false;
}

/** `"All G and VT Spot Instance Requests" (L-3819A6DF) is 0 vCPU (AWS's default: the account's could not be read)`. */
export function describeQuota(which: keyof typeof GPU_QUOTAS, q: QuotaValue): string {
  const { name, code } = GPU_QUOTAS[which];
  if (q.value === undefined) return `"${name}" (${code}) could not be read`;
  return `"${name}" (${code}) is ${q.value} vCPU${q.source === "default" ? " (AWS's default: the account's own value could not be read)" : ""}`;
}

/** The request-a-quota sentence. */
export function quotaRequest(vcpus: number, region: string): string {
  return `request at least ${vcpus} vCPU for "${GPU_QUOTAS.spot.name}" or "${GPU_QUOTAS.onDemand.name}" in the Service Quotas console (EC2), in ${region}`;
}
