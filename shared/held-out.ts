import { sha256Hex } from "./hash.ts";

/**
 * The identity of a held-out set: the sha256 of its images' content ids and labels, sorted. Two versions
 * whose metrics carry the same one were measured on exactly the same images with the same labels, so
 * their numbers compare like for like; any image added, removed, moved between splits or relabelled
 * changes it.
 */
export async function heldOutSha256(images: readonly { id: string; label: string }[]): Promise<string> {
  const lines = images.map((i) => JSON.stringify([i.id, i.label])).sort();
  return sha256Hex(lines.join("\n"));
}

/** What is known of one version's held-out set: how many images, its identity (absent in older versions), its dataset. */
export interface HeldOutOf {
  version: string;
  evaluatedOn: number;
  heldOutSha256?: string | undefined;
  datasetFingerprint: string;
}

/** Whether two versions' numbers are about the same held-out images, and that in a sentence for people. */
export interface HeldOutComparison {
  /** true: the same images; false: not; null: not recorded (a version trained before held-out sets were fingerprinted). */
  same: boolean | null;
  message: string;
}

export function compareHeldOut(a: HeldOutOf, b: HeldOutOf): HeldOutComparison {
  const sizes = a.evaluatedOn === b.evaluatedOn ? `${a.evaluatedOn} held-out images each` : `${a.evaluatedOn} and ${b.evaluatedOn} held-out images`;
  const different: HeldOutComparison = {
    same: false,
    message: `${a.version} and ${b.version} were measured on different held-out images (${sizes}): the dataset or its split changed between them, so their numbers are not a like-for-like comparison.`,
  };
  if (a.heldOutSha256 && b.heldOutSha256) {
    if (a.heldOutSha256 !== b.heldOutSha256) return different;
    return { same: true, message: `Both were measured on the same ${a.evaluatedOn} held-out images: a like-for-like comparison.` };
  }
  // A version trained before the identity was recorded: only a different count proves the sets differ.
  if (a.evaluatedOn !== b.evaluatedOn) return different;
  const older = [a, b].filter((v) => !v.heldOutSha256).map((v) => v.version);
  const dataset = a.datasetFingerprint === b.datasetFingerprint ? "the same dataset" : "different datasets";
  return {
    same: null,
    message: `Whether both were measured on the same held-out images is not known: ${older.join(" and ")} predate${older.length === 1 ? "s" : ""} that record (${sizes}, trained on ${dataset}); read the numbers as possibly not like for like.`,
  };
}
