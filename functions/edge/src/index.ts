import { app } from "./app.ts";

/** Cloudflare Workers entry point. */
export default {
  fetch: app.fetch,
} satisfies ExportedHandler<Env>;
