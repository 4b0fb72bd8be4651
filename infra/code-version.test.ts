import { spawnSync } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { codeVersion } from "./code-version.ts";

describe("codeVersion (what npm run deploy fingerprints)", () => {
  it("changes with a commit, an uncommitted edit and a new file; is undefined outside a git checkout", () => {
    const dir = mkdtempSync(join(tmpdir(), "edgetune-code-"));
    expect(codeVersion(dir)).toBeUndefined();
    const git = (...args: string[]) => spawnSync("git", ["-c", "user.email=t@example.com", "-c", "user.name=t", ...args], { cwd: dir, encoding: "utf8" });
    git("init", "-q");
    writeFileSync(join(dir, "a.ts"), "one");
    git("add", "a.ts");
    git("commit", "-qm", "one");
    const committed = codeVersion(dir);
    expect(codeVersion(dir)).toBe(committed);
    writeFileSync(join(dir, "a.ts"), "two");
    const edited = codeVersion(dir);
    writeFileSync(join(dir, "b.ts"), "new");
    const added = codeVersion(dir);
    writeFileSync(join(dir, "b.ts"), "newer");
    const addedChanged = codeVersion(dir);
    expect(new Set([committed, edited, added, addedChanged]).size).toBe(4);
  });
});
