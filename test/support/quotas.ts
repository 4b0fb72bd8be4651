import { type GetAWSDefaultServiceQuotaCommand, GetServiceQuotaCommand } from "@aws-sdk/client-service-quotas";
import { GPU_QUOTAS, type QuotaClient } from "../../jobs/train/src/gpu-quota.ts";

/** Service Quotas faked at the SDK boundary: the account's quotas by code (an Error: that call fails) and AWS's defaults by code. */
export function fakeQuotas(account: Record<string, number | Error> = {}, defaults: Record<string, number> = {}): QuotaClient {
  return {
    async send(command: GetServiceQuotaCommand | GetAWSDefaultServiceQuotaCommand) {
      const code = command.input.QuotaCode as string;
      const value = command instanceof GetServiceQuotaCommand ? account[code] : defaults[code];
      if (value instanceof Error || value === undefined) throw value ?? new Error(`NoSuchResourceException: ${code}`);
      return { Quota: { Value: value } };
    },
  };
}

const denied = new Error("AccessDeniedException: not authorized to perform servicequotas:GetServiceQuota");
/** A new account whose own G quotas cannot be read (no permission): only AWS's defaults, 0, answer. */
export const UNREADABLE_NEW_ACCOUNT = {
  account: { [GPU_QUOTAS.spot.code]: denied, [GPU_QUOTAS.onDemand.code]: denied },
  defaults: { [GPU_QUOTAS.spot.code]: 0, [GPU_QUOTAS.onDemand.code]: 0 },
};
