import nodeUtil from "node:util";

/**
 * @tensorflow/tfjs-node(-gpu) 4.22 calls `util.isNullOrUndefined` when it builds op attributes, and
 * Node 23 removed that function: on Node 24 every kernel with attributes fails with
 * "(0, util_1.isNullOrUndefined) is not a function" (tensorflow/tfjs#8609, fixed upstream, unreleased).
 * This puts back exactly that function before the native backend loads. Remove it once a tfjs-node
 * release after 4.22 is pinned (the test in backend.test.ts then shows it is no longer needed).
 * Returns whether it had to.
 */
export function restoreIsNullOrUndefined(util: object = nodeUtil): boolean {
  if (typeof (util as { isNullOrUndefined?: unknown }).isNullOrUndefined === "function") return false;
  Object.defineProperty(util, "isNullOrUndefined", {
    value: (value: unknown) => value === null || value === undefined,
    configurable: true,
    writable: true,
  });
  return true;
}
