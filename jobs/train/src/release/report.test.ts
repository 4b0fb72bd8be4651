import { describe, expect, it } from "vitest";
import { cappedLists, renderReportHtml, type TrainingReport } from "./report.ts";

/** A report as a run writes it: a long label, a head and a fine-tuning phase, phases with nested details. */
function report(): TrainingReport {
  const labels = ["a-very-long-label-name-for-birds", "cat"];
  const epoch = (n: number, loss: number, acc: number) => ({ epoch: n, loss, accuracy: acc, valLoss: loss + 0.1, valAccuracy: acc - 0.05 });
  return {
    name: "pets",
    version: "v0123456789ab",
    dataset: { name: "pets", layout: "folders", fingerprint: "f", labels, counts: {} },
    skipped: [],
    nearDuplicates: [],
    ignored: [],
    warnings: [],
    backend: { name: "wasm", reason: "test" },
    base: { id: "darknet-tiny", featureLayer: "out", sha256: "0".repeat(64) },
    options: { strategy: "finetune", imageSize: 96 },
    phases: [{ name: "features", seconds: 2.5, detail: { images: 40, engine: { name: "onnx", threads: 1 }, shareCached: 0.25 } }],
    history: { head: [epoch(1, 0.9, 0.6), epoch(2, 0.5, 0.8)], fineTune: [epoch(1, 0.4, 0.85), epoch(2, 0.3, 0.9), epoch(3, 0.2, 0.95)] },
    metrics: { accuracy: 0.9, evaluatedOn: 10, perClass: {} },
    confusion: [
      [4, 1],
      [0, 5],
    ],
    mistakes: [],
    export: { dtype: "float16", bytes: 1000, maxDelta: 0 },
    promotion: { promoted: true, reason: "first version" },
  };
}

describe("the HTML report", () => {
  it("names every label in full (a cut label carries its full name as a tooltip)", () => {
    const html = renderReportHtml(report());
    expect(html).toContain("a-very-long…<title>a-very-long-label-name-for-birds</title>");
    expect(html).toContain("a-ver…<title>a-very-long-label-name-for-birds</title>");
    expect(html).toContain("<title>a-very-long-label-name-for-birds predicted as cat: 1</title>");
    // A short label is shown whole, with no tooltip needed.
    expect(html).toMatch(/>cat<\/text>/);
  });

  it("shows phases as a table of named values, not raw JSON", () => {
    const html = renderReportHtml(report());
    const phases = html.slice(html.indexOf("<h2>Phases</h2>"));
    expect(phases).toContain("<th>phase</th>");
    expect(phases).toContain('<td>features</td><td class="num">2.5 s</td><td>images: 40<br>engine.name: onnx<br>engine.threads: 1<br>shareCached: 0.250</td>');
    expect(phases).not.toMatch(/[{}]|&#34;/);
  });

  it("draws the curves with axes, units, epoch ticks, a legend and the head/fine-tune boundary", () => {
    const html = renderReportHtml(report());
    for (const text of [
      ">epoch</text>",
      ">loss (cross-entropy)</text>",
      ">accuracy (%)</text>",
      ">training</text>",
      ">validation</text>",
      ">fine-tuning →</text>",
    ])
      expect(html).toContain(text);
    // Epochs 1–5 along the x axis, accuracy ticks 0–100.
    for (const tick of ["1", "2", "3", "4", "5"]) expect(html).toContain(`text-anchor="middle">${tick}</text>`);
    for (const tick of ["0", "50", "100", "0.00"]) expect(html).toContain(`text-anchor="end">${tick}</text>`);
    expect(html).toContain("5 epochs (2 training the head, then 3 fine-tuning)");
  });

  it("lists at most a set number of files per list, and says how many more there were", () => {
    const files = (n: number, what: string) => Array.from({ length: n }, (_, i) => ({ key: `pets/cat/${what}${i}`, reason: "not an image" }));
    const lists = cappedLists({ skipped: files(7, "s"), nearDuplicates: [{ heldOut: "v", training: "t", bits: 1 }], ignored: files(60_000, "i") }, 5);
    expect([lists.skipped.length, lists.nearDuplicates.length, lists.ignored.length]).toEqual([5, 1, 5]);
    expect(lists.omitted).toEqual({ skipped: 2, nearDuplicates: 0, ignored: 59_995 });
    expect(lists.ignored.at(-1)?.key).toBe("pets/cat/i4");
    const html = renderReportHtml({ ...report(), ...lists });
    // The heading counts every skipped file; the list ends with the count of those left out.
    expect(html).toContain("<h2>Skipped files (7)</h2>");
    expect(html).toContain("pets/cat/s4: not an image</li><li>… and 2 more, not listed in the report</li></ul>");
    expect(html).not.toContain("pets/cat/s5");
  });
});
