import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";

/**
 * The identity of the code `npm run deploy` is about to deploy: git HEAD plus every uncommitted change
 * (tracked diffs and untracked files' contents), so an edit that was never committed still counts as new
 * code. Undefined outside a git checkout (or without git): the deploy then reuses no earlier progress.
 */
export function codeVersion(cwd = process.cwd()): string | undefined {
  const git = (args: string[], input?: string) => {
    const r = spawnSync("git", args, { cwd, encoding: "utf8", input, maxBuffer: 256 * 1024 * 1024 });
    return r.status === 0 ? r.stdout : undefined;
  };
  const head = git(["rev-parse", "HEAD"])?.trim();
  const diff = git(["diff", "HEAD", "--binary"]);
  const untracked = git(["ls-files", "--others", "--exclude-standard"]);
  if (!head || diff === undefined || untracked === undefined) return undefined;
  // Each untracked file by content: `git hash-object` names it as git would.
  const contents = untracked.trim() === "" ? "" : git(["hash-object", "--stdin-paths"], untracked);
  if (contents === undefined) return undefined;
  const changes = createHash("sha256").update(diff).update(untracked).update(contents).digest("hex");
  return `${head}+${changes}`;
}
