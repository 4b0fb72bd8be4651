import { join } from "node:path";

/**
 * Reference material beside the clone (never committed; CI puts a copy there). Tests that need the
 * reference bases read them from here and skip, saying why, without it.
 */
export const SHARED = process.env.EDGETUNE_SHARED ?? join(import.meta.dirname, "..", "..", "..", "shared");
export const SHARED_MODELS = join(SHARED, "models");
