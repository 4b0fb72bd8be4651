import { readMetadata } from "../../../../shared/artifacts.ts";
import type { ModelPointer } from "../../../../shared/contracts/artifact.ts";
import { EdgetuneError } from "../../../../shared/errors.ts";
import type { ObjectStore } from "../../../../shared/s3/store.ts";
import type { RunPlan } from "../plan.ts";

/** A run that would change which dataset a model serves, or its labels, without the operator saying so. */
export class OwnershipError extends EdgetuneError {
  constructor(message: string) {
    super("model_owned", message);
  }
}

/**
 * A model belongs to the dataset that created it: a manifest naming another dataset's model (a typo, or
 * on purpose) must not replace what its clients get — the served version would score 0 % on the new
 * labels, so the new one would be promoted. Taking a model over (`--take-over`) or changing its label
 * set (`--relabel`) is an explicit act of its operator, never a side effect of a manifest. The owner is
 * the pointer's `dataset`; pointers written before it existed name the served version's dataset, so
 * existing models keep training as before. A served version that cannot be read does not block (the run
 * replaces a broken version, as before).
 */
export async function checkOwnership(store: ObjectStore, plan: RunPlan, served: ModelPointer | null): Promise<void> {
  if (!served) return;
  const metadata = await readMetadata(store, plan.name, served.version, served.metadataSha256).catch(() => null);
  if (!metadata) return;
  const { name, dataset, options } = plan;
  const owner = served.dataset ?? metadata.dataset.name;
  if (owner !== dataset.name && !options.takeOver) {
    throw new OwnershipError(
      `Model ${name} belongs to dataset ${owner} (it serves ${served.version}, trained on ${owner}); dataset ${dataset.name} does not train into it. Give ${dataset.name} its own model (the manifest's "model"), or make ${dataset.name} the model's dataset on purpose: edgetune train --dataset ${dataset.name} --model ${name} --take-over.`,
    );
  }
  const was = [...metadata.labels].sort();
  const now = [...dataset.labels].sort();
  if (was.join("\n") !== now.join("\n") && !options.relabel && !options.takeOver) {
    const added = now.filter((l) => !was.includes(l));
    const gone = was.filter((l) => !now.includes(l));
    const change = [added.length ? `new: ${added.join(", ")}` : "", gone.length ? `gone: ${gone.join(", ")}` : ""].filter(Boolean).join("; ");
    throw new OwnershipError(
      `Model ${name} serves the labels ${was.join(", ")}; dataset ${dataset.name} now has ${now.join(", ")} (${change}). Its clients would get other labels: to change the model's label set on purpose, edgetune train --dataset ${dataset.name} --model ${name} --relabel.`,
    );
  }
}
