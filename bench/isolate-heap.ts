import { execFileSync } from "node:child_process";
import type { EdgeWorker } from "../infra/local/edge-worker.ts";

/**
 * The JS heap of the worker's isolate in local workerd, read over the DevTools protocol
 * (`Runtime.getHeapUsage`, after the full GC of a heap snapshot): what the worker cannot report itself
 * (Workers expose no heap API). wrangler dev serves DevTools from its proxy workerd on a port it picks and
 * does not print; it is found among that process's listening ports (`ss`, Linux) as the one whose
 * `/json` lists a `/ws` target. Connect only after timing: DevTools enables the debugger in the isolate.
 * A string says why it could not be read.
 */
export async function isolateHeap(edge: EdgeWorker): Promise<{ usedBytes: number; totalBytes: number; collected: boolean } | string> {
  let listening: string;
  try {
    listening = execFileSync("ss", ["-ltnpH"], { encoding: "utf8" });
  } catch {
    return "not measured: `ss` is needed to find wrangler's DevTools port";
  }
  const ports = edge.workerdPids().flatMap((pid) => [...listening.matchAll(new RegExp(`127\\.0\\.0\\.1:(\\d+) .*pid=${pid},`, "g"))].map((m) => m[1]));
  for (const port of ports) {
    const targets = (await fetch(`http://127.0.0.1:${port}/json`)
      .then((r) => r.json())
      .catch(() => null)) as { webSocketDebuggerUrl?: string }[] | null;
    const url = Array.isArray(targets) ? targets.find((t) => t.webSocketDebuggerUrl?.endsWith("/ws"))?.webSocketDebuggerUrl : undefined;
    if (url) return readHeap(url);
  }
  return "not measured: wrangler's DevTools endpoint was not found";
}

async function readHeap(url: string): Promise<{ usedBytes: number; totalBytes: number; collected: boolean } | string> {
  // wrangler's DevTools proxy refuses a connection without a local Origin; Node's WebSocket (undici) takes headers.
  const Ws = WebSocket as unknown as new (url: string, init: { headers: Record<string, string> }) => WebSocket;
  const ws = new Ws(url, { headers: { origin: "http://127.0.0.1" } });
  try {
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error("DevTools connection failed"));
    });
    let next = 0;
    const call = (method: string, timeoutMs = 10_000) =>
      new Promise<Record<string, number> | null>((resolve) => {
        const id = ++next;
        const timer = setTimeout(() => resolve(null), timeoutMs);
        ws.addEventListener("message", (ev) => {
          const m = JSON.parse(String(ev.data)) as { id?: number; result?: Record<string, number> };
          if (m.id !== id) return;
          clearTimeout(timer);
          // workerd answers a heap snapshot with the request echoed, no `result`.
          resolve(m.result ?? {});
        });
        ws.send(JSON.stringify({ id, method, params: {} }));
      });
    // workerd does not answer HeapProfiler.collectGarbage; a heap snapshot runs a full GC first (its chunks are ignored).
    const collected = (await call("HeapProfiler.takeHeapSnapshot", 120_000)) !== null;
    const usage = await call("Runtime.getHeapUsage");
    if (typeof usage?.usedSize !== "number") return "not measured: Runtime.getHeapUsage did not answer";
    return { usedBytes: usage.usedSize as number, totalBytes: usage.totalSize as number, collected };
  } catch (e) {
    return `not measured: ${e instanceof Error ? e.message : e}`;
  } finally {
    ws.close();
  }
}
