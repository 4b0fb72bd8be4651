/** A forward-pool worker that starts, then dies on its first batch, as a native crash would. */
import { parentPort } from "node:worker_threads";

parentPort?.postMessage({ ready: true });
parentPort?.on("message", () => process.exit(7));
