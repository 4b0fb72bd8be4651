import { readMetadata } from "#shared/artifacts.ts";
import type { ArtifactMetadata, ModelPointer } from "#shared/contracts/artifact.ts";
import { EdgetuneError } from "#shared/errors.ts";
import { keys } from "#shared/keys.ts";
import type { ObjectStore } from "#shared/s3/store.ts";
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
 * existing models keep training as before. A served version whose metadata cannot be read does not block
 * (the run replaces a broken version, as before), but the pointer's dataset still owns the model; a model
 * with versions and no pointer (never promoted, or its pointer lost) belongs to its newest version's dataset.
 */
export async function checkOwnership(store: ObjectStore, plan: RunPlan, served: ModelPointer | null): Promise<void> {
  const { name, dataset, options } = plan;
  const metadata = served ? await readMetadata(store, name, served.version, served.metadataSha256).catch(() => null) : null;
  const owner = served ? { dataset: served.dataset ?? metadata?.dataset.name, what: `it serves ${served.version}` } : await newestVersion(store, name);
  if (owner?.dataset !== undefined && owner.dataset !== dataset.name && !options.takeOver) {
    throw new OwnershipError(
      `Model ${name} belongs to dataset ${owner.dataset} (${owner.what}, trained on ${owner.dataset}); dataset ${dataset.name} does not train into it. Give ${dataset.name} its own model (the manifest's "model"), or make ${dataset.name} the model's dataset on purpose: edgetune train --dataset ${dataset.name} --model ${name} --take-over.`,
    );
  }
  if (!metadata) return;
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

/** The dataset of a model's newest readable version (by its metadata's createdAt), for a model no pointer names an owner of. */
async function newestVersion(store: ObjectStore, name: string): Promise<{ dataset: string; what: string } | null> {
  let newest: ArtifactMetadata | null = null;
  for await (const prefix of store.listFolders(keys.model(name))) {
    const version = /^models\/[^/]+\/(v[0-9a-f]{12})\/$/.exec(prefix)?.[1];
    const metadata = version ? await readMetadata(store, name, version).catch(() => null) : null;
    if (metadata && (!newest || metadata.createdAt > newest.createdAt)) newest = metadata;
  }
  return newest ? { dataset: newest.dataset.name, what: `its newest version ${newest.version}, none served` } : null;
}
