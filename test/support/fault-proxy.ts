import { createServer, request } from "node:http";
import type { AddressInfo } from "node:net";

/**
 * An HTTP proxy in front of the local S3 server that fails some requests the way S3 and networks do:
 * 503 SlowDown (S3's "reduce your request rate"), 500 InternalError, or a connection reset. Which
 * requests fail is decided by a counter (every `every`-th), so runs are reproducible — or, with `down`,
 * by a predicate: matching requests get their connection reset (that part of S3 is down).
 */
export interface FaultProxy {
  endpoint: string;
  injected: { slowDown: number; internal: number; reset: number };
  total: number;
  /** Every request seen, in order. */
  requests: { method: string; path: string }[];
  /** Requests held open right now by `hang`. */
  hanging: number;
  stop(): Promise<void>;
}

export async function startFaultProxy(
  upstream: string,
  options: {
    every: number;
    down?: (req: { method: string; path: string }) => boolean;
    /** Matching requests are held open, unanswered (a bucket that hangs): counted in `hanging`. */
    hang?: (req: { method: string; path: string }) => boolean;
    /** An S3 error code (InvalidAccessKeyId, AccessDenied…) to refuse a request with, as 403; undefined: not refused. */
    refuse?: (req: { method: string; path: string }) => string | undefined;
  },
): Promise<FaultProxy> {
  const target = new URL(upstream);
  const state: FaultProxy = { endpoint: "", injected: { slowDown: 0, internal: 0, reset: 0 }, total: 0, requests: [], hanging: 0, stop: async () => {} };
  const server = createServer((req, res) => {
    state.total++;
    state.requests.push({ method: req.method ?? "GET", path: req.url ?? "/" });
    const n = state.total;
    if (options.hang?.({ method: req.method ?? "GET", path: req.url ?? "/" })) {
      state.hanging++;
      req.resume();
      res.on("close", () => state.hanging--);
      return;
    }
    if (options.down?.({ method: req.method ?? "GET", path: req.url ?? "/" })) {
      state.injected.reset++;
      req.socket.destroy();
      return;
    }
    const refusal = options.refuse?.({ method: req.method ?? "GET", path: req.url ?? "/" });
    if (refusal) {
      req.resume();
      res.writeHead(403, { "content-type": "application/xml" });
      res.end(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>${refusal}</Code><Message>refused by the test</Message><RequestId>fault</RequestId></Error>`);
      return;
    }
    if (n % options.every === 0) {
      const kind = (n / options.every) % 3;
      if (kind === 0) {
        state.injected.reset++;
        req.socket.destroy();
        return;
      }
      const [status, code] = kind === 1 ? [503, "SlowDown"] : [500, "InternalError"];
      if (kind === 1) state.injected.slowDown++;
      else state.injected.internal++;
      req.resume();
      res.writeHead(status, { "content-type": "application/xml" });
      res.end(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>${code}</Code><Message>injected fault</Message><RequestId>fault</RequestId></Error>`);
      return;
    }
    const up = request({ host: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers }, (upRes) => {
      res.writeHead(upRes.statusCode ?? 502, upRes.headers);
      upRes.pipe(res);
    });
    up.on("error", () => res.destroy());
    req.pipe(up);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  state.endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  state.stop = () =>
    new Promise((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    });
  return state;
}
