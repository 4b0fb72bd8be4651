import { describe, expect, it } from "vitest";
import { safeText } from "./output.ts";

describe("text from storage on a terminal", () => {
  it("shows control and invisible characters as visible escapes, so nothing can rewrite the screen", () => {
    expect(safeText("cat\u001b[2J\u001b]0;title\u0007")).toBe("cat\\x1b[2J\\x1b]0;title\\x07");
    expect(safeText("a\u009bb\u200bc\u202ed\r\n")).toBe("a\\x9bb\\u200bc\\u202ed\\x0d\\x0a");
    expect(safeText("one\ntwo\u001b", true)).toBe("one\ntwo\\x1b");
    expect(safeText("café 猫 ✓")).toBe("café 猫 ✓");
  });
});
