import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { EdgetuneError } from "#shared/errors.ts";

/**
 * The Cloudflare side of `npm run deploy`, for any account: which account to deploy to is settled in the
 * preflight, before anything is deployed — CLOUDFLARE_ACCOUNT_ID, else `account_id` in wrangler.jsonc,
 * else the one remembered from an earlier deploy, else `wrangler whoami --json`: one account is taken,
 * several are asked about when a person is at the terminal and refused with the list when not. Every
 * wrangler call then gets CLOUDFLARE_ACCOUNT_ID, so none of them has to pick (wrangler refuses to in
 * non-interactive mode).
 */
export class CloudflareAccountError extends EdgetuneError {}

export interface CloudflareAccount {
  id: string;
  name?: string;
  /** Where the choice came from, said in the deploy's log. */
  from: "CLOUDFLARE_ACCOUNT_ID" | "wrangler.jsonc" | "earlier deploy" | "the only account" | "your choice";
}

/** Runs wrangler with arguments, returning its exit status and output (captured). */
export type Wrangler = (args: string[], env?: Record<string, string>) => { status: number | null; stdout: string; stderr: string };

export async function chooseAccount(options: {
  env: Record<string, string | undefined>;
  wranglerConfig: string;
  remembered?: string;
  wrangler: Wrangler;
  /** Asks a person; undefined when nobody is at the terminal. */
  ask?: (question: string) => Promise<string>;
}): Promise<CloudflareAccount> {
  if (options.env.CLOUDFLARE_ACCOUNT_ID) return { id: options.env.CLOUDFLARE_ACCOUNT_ID, from: "CLOUDFLARE_ACCOUNT_ID" };
  const configured = /"account_id"\s*:\s*"([0-9a-f]{32})"/.exec(readFileSync(options.wranglerConfig, "utf8"))?.[1];
  if (configured) return { id: configured, from: "wrangler.jsonc" };
  if (options.remembered) return { id: options.remembered, from: "earlier deploy" };
  const r = options.wrangler(["whoami", "--json"]);
  let accounts: { id: string; name: string }[] = [];
  try {
    const who = JSON.parse(r.stdout) as { loggedIn?: boolean; accounts?: { id: string; name: string }[] };
    accounts = who.loggedIn ? (who.accounts ?? []) : [];
  } catch {
    accounts = [];
  }
  if (r.status !== 0 || accounts.length === 0)
    throw new CloudflareAccountError(
      "cloudflare_login",
      "Not logged in to Cloudflare (wrangler whoami found no account): run  npx wrangler login  (or set CLOUDFLARE_API_TOKEN), then npm run deploy again.",
    );
  const [only] = accounts;
  if (accounts.length === 1 && only) return { id: only.id, name: only.name, from: "the only account" };
  const list = accounts.map((a, i) => `  ${i + 1}. ${a.name}  ${a.id}`).join("\n");
  if (!options.ask)
    throw new CloudflareAccountError(
      "cloudflare_account",
      `This Cloudflare login has ${accounts.length} accounts; say which one the worker goes to with CLOUDFLARE_ACCOUNT_ID=<id> npm run deploy:\n${list}`,
    );
  const answer = (await options.ask(`Which Cloudflare account should the worker be deployed to?\n${list}\nNumber or account id: `)).trim();
  const picked = accounts[Number(answer) - 1] ?? accounts.find((a) => a.id === answer);
  if (!picked) throw new CloudflareAccountError("cloudflare_account", `"${answer}" is none of the accounts listed; run npm run deploy again.`);
  return { id: picked.id, name: picked.name, from: "your choice" };
}

/** Runs wrangler without blocking the event loop (so a signal reaches our handlers while it runs). */
export type WranglerAsync = (args: string[], env?: Record<string, string>) => Promise<ReturnType<Wrangler>>;

const CLEANUP_SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP"] as const;

/**
 * `wrangler secret bulk <file>`: the secrets go through a file (mode 0600, in a directory of its own,
 * removed afterwards), not stdin — so wrangler's stdin stays the terminal and nothing secret sits in a
 * pipe or a command line. Removed on Ctrl-C or a kill too: Node's default for those signals is to die at
 * once, skipping `finally`; while the file exists, a handler removes it and then dies of the same signal.
 */
export async function putSecrets(
  wrangler: WranglerAsync,
  secrets: Record<string, string>,
  args: string[],
  env: Record<string, string>,
): Promise<ReturnType<Wrangler>> {
  const dir = mkdtempSync(join(tmpdir(), "edgetune-secrets-"));
  const remove = () => rmSync(dir, { recursive: true, force: true });
  const stopWatching = () => {
    for (const signal of CLEANUP_SIGNALS) process.off(signal, onSignal);
  };
  const onSignal = (signal: NodeJS.Signals) => {
    remove();
    stopWatching();
    process.kill(process.pid, signal); // Node's default action now: the process ends as it would have
  };
  for (const signal of CLEANUP_SIGNALS) process.on(signal, onSignal);
  try {
    const file = join(dir, "secrets.json");
    writeFileSync(file, JSON.stringify(secrets), { mode: 0o600 });
    return await wrangler(["secret", "bulk", file, ...args], env);
  } finally {
    remove();
    stopWatching();
  }
}
