/** The CDK app's stacks, in deploy order (infra/app.ts builds them, infra/deploy-pipeline.ts deploys them). */
export const STACKS = { core: "Edgetune", gpu: "EdgetuneGpu" } as const;
