import { describe, expect, it } from "vitest";
import { hmacSha256Hex, signedWithAny } from "./hash.ts";

describe("signedWithAny", () => {
  const message = "edgetune-request-v2\npets\n20261206T051500-abcd1234";

  it("accepts the HMAC of the message under any of the keys, and nothing else", async () => {
    const signature = await hmacSha256Hex("second-key", message);
    expect(await signedWithAny(signature, message, ["first-key", "second-key"])).toBe(true);
    expect(await signedWithAny(signature, message, ["first-key"])).toBe(false);
    expect(await signedWithAny(signature, `${message}x`, ["second-key"])).toBe(false);
    expect(await signedWithAny(signature, message, [])).toBe(false);
  });

  it("refuses a missing, short or upper-case signature", async () => {
    const signature = await hmacSha256Hex("key", message);
    expect(await signedWithAny(undefined, message, ["key"])).toBe(false);
    expect(await signedWithAny(signature.slice(0, 62), message, ["key"])).toBe(false);
    expect(await signedWithAny(signature.toUpperCase(), message, ["key"])).toBe(false);
  });
});
