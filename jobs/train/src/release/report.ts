import type { EpochLog } from "../fit/head.ts";

/**
 * The training report stored with every version: `report.json` for machines and a self-contained
 * `report.html` (inline SVG, thumbnails as data URLs) for people.
 */
export interface TrainingReport {
  name: string;
  version: string;
  dataset: { name: string; layout: string; fingerprint: string; labels: string[]; counts: Record<string, { train: number; val: number; test: number }> };
  skipped: { key: string; reason: string }[];
  /** Held-out images left out of the evaluation as near-identical to a training image. */
  nearDuplicates: { heldOut: string; training: string; bits: number }[];
  ignored: { key: string; reason: string }[];
  warnings: string[];
  backend: { name: string; reason: string };
  base: { id: string; featureLayer: string; pooledLayers?: string[]; sha256: string; choice?: { requested: string; reason: string } };
  options: Record<string, unknown>;
  phases: { name: string; seconds: number; detail?: Record<string, unknown> }[];
  history: { head: EpochLog[]; fineTune: EpochLog[] };
  metrics: {
    accuracy: number;
    evaluatedOn: number;
    loss?: number;
    perClass: Record<string, { precision: number; recall: number; f1: number; support: number }>;
  };
  confusion: number[][];
  mistakes: { key: string; label: string; predicted: string; score: number; thumbnail?: string }[];
  /** Top score of each held-out image, ascending (absent in versions trained before it was kept). */
  heldOutScores?: number[];
  export: { dtype: string; bytes: number; maxDelta: number };
  promotion: { promoted: boolean; reason: string; current?: { version: string; accuracy: number } };
}

const esc = (s: string) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
/** A share as a percentage with one decimal, the way reports and log lines show accuracy. */
export const pct = (v: number) => `${(v * 100).toFixed(1)} %`;

export function renderReportHtml(r: TrainingReport): string {
  const labels = r.dataset.labels;
  const maxCell = Math.max(1, ...r.confusion.flat());
  const cell = 36;
  const confusion = `<svg width="${(labels.length + 1) * cell + 80}" height="${(labels.length + 1) * cell + 40}" role="img" aria-label="confusion matrix">
${r.confusion
  .map((row, i) =>
    row
      .map(
        (v, j) =>
          `<rect x="${80 + j * cell}" y="${20 + i * cell}" width="${cell - 2}" height="${cell - 2}" fill="rgba(30,90,200,${(v / maxCell).toFixed(3)})"/><text x="${80 + j * cell + cell / 2 - 1}" y="${20 + i * cell + cell / 2 + 4}" text-anchor="middle" font-size="11" fill="${v / maxCell > 0.5 ? "#fff" : "#000"}">${v}</text>`,
      )
      .join(""),
  )
  .join("\n")}
${labels.map((l, i) => `<text x="76" y="${20 + i * cell + cell / 2 + 4}" text-anchor="end" font-size="11">${esc(l.slice(0, 12))}</text>`).join("")}
${labels.map((l, j) => `<text x="${80 + j * cell + cell / 2}" y="${30 + labels.length * cell}" text-anchor="middle" font-size="10">${esc(l.slice(0, 6))}</text>`).join("")}
</svg>`;
  const curves = [...r.history.head.map((h) => ({ ...h, phase: "head" })), ...r.history.fineTune.map((h) => ({ ...h, phase: "fine-tune" }))];
  const w = 520;
  const h = 200;
  const maxLoss = Math.max(0.01, ...curves.flatMap((c) => [c.loss, c.valLoss ?? 0]));
  const line = (values: (number | undefined)[], max: number, colour: string) => {
    const pts = values
      .map((v, i) =>
        v === undefined ? null : `${(30 + (i / Math.max(1, values.length - 1)) * (w - 40)).toFixed(1)},${(h - 20 - (v / max) * (h - 40)).toFixed(1)}`,
      )
      .filter(Boolean)
      .join(" ");
    return `<polyline fill="none" stroke="${colour}" stroke-width="2" points="${pts}"/>`;
  };
  const chart = `<svg width="${w}" height="${h}" role="img" aria-label="training curves"><rect x="30" y="20" width="${w - 40}" height="${h - 40}" fill="#fafafa" stroke="#ccc"/>
${line(
  curves.map((c) => c.loss),
  maxLoss,
  "#c33",
)}${line(
  curves.map((c) => c.valLoss),
  maxLoss,
  "#f99",
)}${line(
  curves.map((c) => c.accuracy),
  1,
  "#33c",
)}${line(
  curves.map((c) => c.valAccuracy),
  1,
  "#99f",
)}
<text x="34" y="14" font-size="11">loss (red, val light) · accuracy (blue, val light) · ${curves.length} epochs</text></svg>`;
  const perClass = Object.entries(r.metrics.perClass)
    .map(([l, m]) => `<tr><td>${esc(l)}</td><td>${pct(m.precision)}</td><td>${pct(m.recall)}</td><td>${pct(m.f1)}</td><td>${m.support}</td></tr>`)
    .join("");
  const mistakes = r.mistakes
    .map(
      (m) =>
        `<figure>${m.thumbnail ? `<img src="${m.thumbnail}" alt="">` : ""}<figcaption>${esc(m.key.split("/").slice(-2).join("/"))}<br>${esc(m.label)} → <b>${esc(m.predicted)}</b> ${pct(m.score)}</figcaption></figure>`,
    )
    .join("");
  return `<!doctype html><html lang="en"><meta charset="utf-8"><title>edgetune ${esc(r.name)} ${esc(r.version)}</title>
<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:1000px}table{border-collapse:collapse}td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}figure{display:inline-block;margin:4px;width:140px;font-size:11px;vertical-align:top}img{width:96px;height:96px;object-fit:cover}</style>
<h1>${esc(r.name)} · ${esc(r.version)}</h1>
<p>Accuracy <b>${pct(r.metrics.accuracy)}</b> on ${r.metrics.evaluatedOn} held-out images · strategy ${esc(String(r.options.strategy))} · base ${esc(r.base.id)} (${esc(r.base.featureLayer)}${r.base.choice ? `; ${esc(r.base.choice.requested)}: ${esc(r.base.choice.reason)}` : ""}) · ${esc(String(r.options.imageSize))} px · backend ${esc(r.backend.name)}</p>
<p>${r.promotion.promoted ? "Promoted" : "Not promoted"}: ${esc(r.promotion.reason)}</p>
${r.warnings.length ? `<ul>${r.warnings.map((w2) => `<li>${esc(w2)}</li>`).join("")}</ul>` : ""}
<h2>Training curves</h2>${chart}
<h2>Per class</h2><table><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>${perClass}</table>
<h2>Confusion matrix</h2><p>rows: true label · columns: predicted</p>${confusion}
<h2>Most confidently wrong</h2>${mistakes || "<p>none</p>"}
${r.nearDuplicates.length ? `<h2>Held-out images left out as near-duplicates of training images (${r.nearDuplicates.length})</h2><ul>${r.nearDuplicates.map((d) => `<li>${esc(d.heldOut)} ≈ ${esc(d.training)} (input hashes ${d.bits} bits apart)</li>`).join("")}</ul>` : ""}
<h2>Skipped files (${r.skipped.length})</h2><ul>${r.skipped.map((s) => `<li>${esc(s.key)}: ${esc(s.reason)}</li>`).join("")}</ul>
<h2>Phases</h2><table>${r.phases.map((p) => `<tr><td>${esc(p.name)}</td><td>${p.seconds.toFixed(1)} s</td><td>${esc(JSON.stringify(p.detail ?? {}))}</td></tr>`).join("")}</table>
</html>
`;
}
