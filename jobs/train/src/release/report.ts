import type { ReliabilityBin } from "../fit/calibrate.ts";
import type { EpochLog } from "../fit/head.ts";
import type { OodEvaluation } from "./ood.ts";
import { esc, lineChart } from "./report-chart.ts";
import type { AnsweredMetrics, LabelThreshold } from "./thresholds.ts";

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
  /** How many entries of each list above were left out of it (cappedLists); absent in older reports. */
  omitted?: FileLists<number>;
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
  /** Temperature scaling (fit/calibrate.ts); absent in reports of older versions. */
  calibration?: { temperature: number; folds: number; eceBefore: number; eceAfter: number; reliability: { before: ReliabilityBin[]; after: ReliabilityBin[] } };
  /** Per-label thresholds and their cross-fitted effect (release/thresholds.ts). */
  thresholds?: { policy: string; byLabel: Record<string, LabelThreshold> } & AnsweredMetrics;
  noneLabel?: string;
  /** The novelty rule (shared/novelty.ts): its similarity floor, the share of the labels' held-out images below it, the share asked for. */
  novelty?: { floor: number; heldOutRejected: number; reject: number };
  /** The manifest's out-of-distribution folder, scored end to end (release/ood.ts); absent without one. */
  ood?: OodEvaluation;
}

type FileLists<T> = { skipped: T; nearDuplicates: T; ignored: T };
/**
 * Entries kept per file list of a report. Every non-image file of a dataset is listed (ignored): 60k
 * sidecar files would make report.json megabytes, more than the console reads. 1000 entries are ~100 KB.
 */
export const MAX_LISTED_FILES = 1000;

/** The report's file lists, each cut to its first `max` entries, and how many were left out of each. */
export function cappedLists(
  lists: Pick<TrainingReport, "skipped" | "nearDuplicates" | "ignored">,
  max = MAX_LISTED_FILES,
): Pick<TrainingReport, "skipped" | "nearDuplicates" | "ignored"> & { omitted: FileLists<number> } {
  const left = (l: readonly unknown[]) => Math.max(0, l.length - max);
  return {
    skipped: lists.skipped.slice(0, max),
    nearDuplicates: lists.nearDuplicates.slice(0, max),
    ignored: lists.ignored.slice(0, max),
    omitted: { skipped: left(lists.skipped), nearDuplicates: left(lists.nearDuplicates), ignored: left(lists.ignored) },
  };
}

/** The last line of a cut list: how many entries the report left out. */
const more = (n = 0) => (n > 0 ? `<li>… and ${n} more, not listed in the report</li>` : "");
/** A share as a percentage with one decimal, the way reports and log lines show accuracy. */
export const pct = (v: number) => `${(v * 100).toFixed(1)} %`;

/** A label cut to `max` characters for a chart, its full text as the tooltip (SVG title) when cut. */
function shortLabel(label: string, max: number): string {
  const chars = [...label];
  return chars.length <= max ? esc(label) : `${esc(chars.slice(0, max - 1).join(""))}…<title>${esc(label)}</title>`;
}

/** A phase's details as "name: value" lines (nested values by their dotted names), not raw JSON. */
function details(detail: Record<string, unknown> | undefined): string {
  const lines: string[] = [];
  const walk = (value: unknown, path: string) => {
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      for (const [k, v] of Object.entries(value)) walk(v, path ? `${path}.${k}` : k);
    } else {
      const shown = Array.isArray(value) ? value.join(", ") : typeof value === "number" && !Number.isInteger(value) ? value.toFixed(3) : String(value);
      lines.push(`${esc(path)}: ${esc(shown)}`);
    }
  };
  walk(detail ?? {}, "");
  return lines.join("<br>");
}

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
          `<rect x="${80 + j * cell}" y="${20 + i * cell}" width="${cell - 2}" height="${cell - 2}" fill="rgba(30,90,200,${(v / maxCell).toFixed(3)})"><title>${esc(labels[i] ?? "")} predicted as ${esc(labels[j] ?? "")}: ${v}</title></rect><text x="${80 + j * cell + cell / 2 - 1}" y="${20 + i * cell + cell / 2 + 4}" text-anchor="middle" font-size="11" fill="${v / maxCell > 0.5 ? "#fff" : "#000"}">${v}</text>`,
      )
      .join(""),
  )
  .join("\n")}
${labels.map((l, i) => `<text x="76" y="${20 + i * cell + cell / 2 + 4}" text-anchor="end" font-size="11">${shortLabel(l, 12)}</text>`).join("")}
${labels.map((l, j) => `<text x="${80 + j * cell + cell / 2}" y="${30 + labels.length * cell}" text-anchor="middle" font-size="10">${shortLabel(l, 6)}</text>`).join("")}
</svg>`;
  const curves = [...r.history.head, ...r.history.fineTune];
  const marker = r.history.head.length > 0 && r.history.fineTune.length > 0 ? { after: r.history.head.length, label: "fine-tuning →" } : undefined;
  const charts = [
    lineChart({
      title: "Loss per epoch",
      yLabel: "loss (cross-entropy)",
      yMax: Math.max(0.01, ...curves.flatMap((c) => [c.loss, c.valLoss ?? 0])),
      format: (v) => v.toFixed(2),
      series: [
        { name: "training", colour: "#c33", values: curves.map((c) => c.loss) },
        { name: "validation", colour: "#c33", dashed: true, values: curves.map((c) => c.valLoss) },
      ],
      marker,
    }),
    lineChart({
      title: "Accuracy per epoch",
      yLabel: "accuracy (%)",
      yMax: 1,
      format: (v) => `${Math.round(v * 100)}`,
      series: [
        { name: "training", colour: "#33c", values: curves.map((c) => c.accuracy) },
        { name: "validation", colour: "#33c", dashed: true, values: curves.map((c) => c.valAccuracy) },
      ],
      marker,
    }),
  ].join("\n");
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
<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:1000px}table{border-collapse:collapse}td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}.num{text-align:right;white-space:nowrap}figure{display:inline-block;margin:4px;width:140px;font-size:11px;vertical-align:top}img{width:96px;height:96px;object-fit:cover}</style>
<h1>${esc(r.name)} · ${esc(r.version)}</h1>
<p>Accuracy <b>${pct(r.metrics.accuracy)}</b> on ${r.metrics.evaluatedOn} held-out images · strategy ${esc(String(r.options.strategy))} · base ${esc(r.base.id)} (${esc(r.base.featureLayer)}${r.base.choice ? `; ${esc(r.base.choice.requested)}: ${esc(r.base.choice.reason)}` : ""}) · ${esc(String(r.options.imageSize))} px · backend ${esc(r.backend.name)}</p>
<p>${r.promotion.promoted ? "Promoted" : "Not promoted"}: ${esc(r.promotion.reason)}</p>
${r.warnings.length ? `<ul>${r.warnings.map((w2) => `<li>${esc(w2)}</li>`).join("")}</ul>` : ""}
<h2>Training curves</h2><p>${curves.length} epochs${marker ? ` (${r.history.head.length} training the head, then ${r.history.fineTune.length} fine-tuning)` : ""}; validation is the split held out of training.</p>${charts}
${answersHtml(r)}
<h2>Per class</h2><table><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>${perClass}</table>
<h2>Confusion matrix</h2><p>rows: true label · columns: predicted</p>${confusion}
<h2>Most confidently wrong</h2>${mistakes || "<p>none</p>"}
${r.nearDuplicates.length ? `<h2>Held-out images left out as near-duplicates of training images (${r.nearDuplicates.length + (r.omitted?.nearDuplicates ?? 0)})</h2><ul>${r.nearDuplicates.map((d) => `<li>${esc(d.heldOut)} ≈ ${esc(d.training)} (input hashes ${d.bits} bits apart)</li>`).join("")}${more(r.omitted?.nearDuplicates)}</ul>` : ""}
<h2>Skipped files (${r.skipped.length + (r.omitted?.skipped ?? 0)})</h2><ul>${r.skipped.map((s) => `<li>${esc(s.key)}: ${esc(s.reason)}</li>`).join("")}${more(r.omitted?.skipped)}</ul>
<h2>Phases</h2><table><tr><th>phase</th><th class="num">time</th><th>details</th></tr>${r.phases.map((p) => `<tr><td>${esc(p.name)}</td><td class="num">${p.seconds.toFixed(1)} s</td><td>${details(p.detail)}</td></tr>`).join("")}</table>
</html>
`;
}

/** A reliability diagram: per confidence bin, accuracy (bars) against the diagonal of perfect calibration. */
function reliabilitySvg(bins: readonly ReliabilityBin[], title: string): string {
  const size = 220;
  const pad = 30;
  const span = size - 2 * pad;
  const bars = bins
    .filter((b) => b.count > 0)
    .map((b) => {
      const x = pad + b.lower * span;
      const h = b.accuracy * span;
      const gap = (b.confidence - b.accuracy) * span;
      return `<rect x="${x.toFixed(1)}" y="${(size - pad - h).toFixed(1)}" width="${((b.upper - b.lower) * span - 1).toFixed(1)}" height="${h.toFixed(1)}" fill="#3a6fd0"><title>${pct(b.lower)}–${pct(b.upper)}: ${b.count} answers, mean score ${pct(b.confidence)}, right ${pct(b.accuracy)}</title></rect>${
        Math.abs(gap) > 0.5
          ? `<rect x="${x.toFixed(1)}" y="${(size - pad - Math.max(h, h + gap)).toFixed(1)}" width="${((b.upper - b.lower) * span - 1).toFixed(1)}" height="${Math.abs(gap).toFixed(1)}" fill="rgba(220,60,60,0.35)"/>`
          : ""
      }`;
    })
    .join("");
  return `<svg width="${size}" height="${size}" role="img" aria-label="reliability diagram ${esc(title)}"><rect x="${pad}" y="${pad}" width="${span}" height="${span}" fill="#fafafa" stroke="#ccc"/>${bars}<line x1="${pad}" y1="${size - pad}" x2="${size - pad}" y2="${pad}" stroke="#888" stroke-dasharray="4 3"/><text x="${pad}" y="18" font-size="11">${esc(title)}</text><text x="${pad}" y="${size - 8}" font-size="10">score →  (bars: share right; red: gap)</text></svg>`;
}

function answersHtml(r: TrainingReport): string {
  const c = r.calibration;
  const t = r.thresholds;
  if (!c || !t) return "";
  const rows = Object.entries(t.byLabel)
    .map(
      ([l, v]) =>
        `<tr><td>${esc(l)}</td><td>${pct(v.threshold)}</td><td>${pct(v.precision)}</td><td>${pct(v.recall)}</td><td>${v.reached ? "" : "target not reached"}</td></tr>`,
    )
    .join("");
  return `<h2>Calibration</h2><p>Scores divided in logit space by a temperature of <b>${c.temperature.toFixed(3)}</b> (folded into the model: its scores are the calibrated ones). Expected calibration error on the held-out images: <b>${pct(c.eceBefore)}</b> before, <b>${pct(c.eceAfter)}</b> after (after: each image scored with a temperature fitted on the other ${c.folds - 1} of ${c.folds} folds).</p>
${reliabilitySvg(c.reliability.before, "before")} ${reliabilitySvg(c.reliability.after, "after (out of fold)")}
<h2>Answers: thresholds${r.noneLabel || r.novelty ? " and none of these" : ""}</h2><p>Policy <b>${esc(t.policy)}</b>: below its label's threshold an answer is <i>unsure</i>${r.noneLabel ? `; an answer of <b>${esc(r.noneLabel)}</b> is <i>none of these</i>` : ""}${noveltyHtml(r.novelty)}. On the held-out images of the labels (thresholds${r.novelty ? " and similarity floor" : ""} cross-fitted): <b>${pct(t.answered)}</b> answered with a label, ${pct(t.answeredAccuracy)} of them right (top-1 over all: ${pct(r.metrics.accuracy)}); ${pct(t.unsure)} unsure${r.noneLabel || r.novelty ? `, ${pct(t.none)} wrongly none of these` : ""}${r.noneLabel ? `; of the none-of-these folder's held-out images, ${pct(t.negativesRejected ?? 0)} given no label` : ""}.</p>
<table><tr><th>label</th><th>threshold</th><th>precision</th><th>recall</th><th></th></tr>${rows}</table>${oodHtml(r.ood)}`;
}

/** The novelty rule's sentence: what it is and where its floor sits. */
function noveltyHtml(n: TrainingReport["novelty"]): string {
  if (!n) return "";
  return `; an image whose features are less like every label's training images than a cosine similarity of <b>${n.floor.toFixed(3)}</b> is <i>none of these</i> (the floor below which ${pct(n.reject)} of the labels' held-out images fall; measured: ${pct(n.heldOutRejected)})`;
}

/** The out-of-distribution folder's result, or where to get one. */
function oodHtml(o: OodEvaluation | undefined): string {
  if (!o)
    return '<h2>Out of distribution</h2><p>Not measured: the dataset has no out-of-distribution folder (images that are none of the labels, never trained on; name it in the manifest as <code>"oodFolder"</code>).</p>';
  const undecodable = o.undecodable > 0 ? ` (${o.undecodable} could not be decoded)` : "";
  return `<h2>Out of distribution</h2><p>The <b>${esc(o.folder)}</b> folder's ${o.images} images${undecodable}, scored by the exported model and never trained on: <b>${pct(o.rejected)}</b> given no label (${pct(o.unsure)} unsure, ${pct(o.none)} none of these). AUROC of the rejection score (1 − the best label's score) against the ${o.heldOut} held-out images of the labels: <b>${Number.isFinite(o.auroc) ? o.auroc.toFixed(3) : "–"}</b> (1: every one of these images scores above every held-out image; 0.5: no better than chance)${o.similarityAuroc === undefined ? "" : `; of the novelty rule's score (1 − the similarity to the nearest label's training images): <b>${Number.isFinite(o.similarityAuroc) ? o.similarityAuroc.toFixed(3) : "–"}</b>`}.</p>`;
}
