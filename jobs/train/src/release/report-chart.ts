/**
 * Line charts for the training report: inline SVG with both axes drawn, ticks, the quantity and its
 * unit on each, and a legend, so a chart reads without the code that drew it.
 */
export interface Series {
  name: string;
  colour: string;
  /** One value per epoch; undefined where the epoch has none (no validation split). */
  values: (number | undefined)[];
  dashed?: boolean;
}

export interface LineChart {
  title: string;
  /** The y axis's quantity and unit, e.g. "accuracy (%)". */
  yLabel: string;
  yMax: number;
  /** A y value as its tick shows it. */
  format: (v: number) => string;
  series: Series[];
  /** Epoch (1-based) after which a phase ends, drawn as a vertical rule with its name. */
  marker?: { after: number; label: string };
}

const W = 560;
const H = 240;
const LEFT = 56;
const RIGHT = 16;
const TOP = 28;
const BOTTOM = 44;
/** Text for HTML: the report and its charts escape the same way. */
export const esc = (s: string) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

export function lineChart(c: LineChart): string {
  const epochs = Math.max(1, ...c.series.map((s) => s.values.length));
  const plotW = W - LEFT - RIGHT;
  const plotH = H - TOP - BOTTOM;
  const x = (epoch: number) => LEFT + (epochs === 1 ? plotW / 2 : ((epoch - 1) / (epochs - 1)) * plotW);
  const y = (v: number) => TOP + plotH - (Math.min(v, c.yMax) / c.yMax) * plotH;
  const yTicks = [0, 0.25, 0.5, 0.75, 1].map((f) => f * c.yMax);
  // At most about 10 epoch ticks, on whole epochs.
  const step = Math.max(1, Math.ceil(epochs / 10));
  const xTicks = Array.from({ length: epochs }, (_, i) => i + 1).filter((e) => e === 1 || e % step === 0);
  const lines = c.series.map((s) => {
    const pts = s.values.flatMap((v, i) => (v === undefined ? [] : [`${x(i + 1).toFixed(1)},${y(v).toFixed(1)}`])).join(" ");
    return pts ? `<polyline fill="none" stroke="${s.colour}" stroke-width="2"${s.dashed ? ' stroke-dasharray="5 3"' : ""} points="${pts}"/>` : "";
  });
  const legend = c.series
    .map((s, i) => {
      const lx = LEFT + i * 130;
      return `<line x1="${lx}" y1="${TOP - 12}" x2="${lx + 18}" y2="${TOP - 12}" stroke="${s.colour}" stroke-width="2"${s.dashed ? ' stroke-dasharray="5 3"' : ""}/><text x="${lx + 22}" y="${TOP - 8}" font-size="11">${esc(s.name)}</text>`;
    })
    .join("");
  // Between the phase's last epoch and the next one.
  const mx = c.marker ? (c.marker.after < epochs ? (x(c.marker.after) + x(c.marker.after + 1)) / 2 : x(c.marker.after)) : 0;
  const marker = c.marker
    ? `<line x1="${mx.toFixed(1)}" y1="${TOP}" x2="${mx.toFixed(1)}" y2="${TOP + plotH}" stroke="#888" stroke-dasharray="2 3"/><text x="${(mx + 4).toFixed(1)}" y="${TOP + 12}" font-size="10" fill="#555">${esc(c.marker.label)}</text>`
    : "";
  return `<svg width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(c.title)}"><title>${esc(c.title)}</title>
<rect x="${LEFT}" y="${TOP}" width="${plotW}" height="${plotH}" fill="#fafafa"/>
${yTicks.map((v) => `<line x1="${LEFT - 4}" y1="${y(v).toFixed(1)}" x2="${LEFT + plotW}" y2="${y(v).toFixed(1)}" stroke="#e4e4e4"/><text x="${LEFT - 6}" y="${(y(v) + 4).toFixed(1)}" font-size="10" text-anchor="end">${esc(c.format(v))}</text>`).join("")}
${xTicks.map((e) => `<line x1="${x(e).toFixed(1)}" y1="${TOP + plotH}" x2="${x(e).toFixed(1)}" y2="${TOP + plotH + 4}" stroke="#333"/><text x="${x(e).toFixed(1)}" y="${TOP + plotH + 16}" font-size="10" text-anchor="middle">${e}</text>`).join("")}
<line x1="${LEFT}" y1="${TOP}" x2="${LEFT}" y2="${TOP + plotH}" stroke="#333"/><line x1="${LEFT}" y1="${TOP + plotH}" x2="${LEFT + plotW}" y2="${TOP + plotH}" stroke="#333"/>
<text x="${LEFT + plotW / 2}" y="${H - 6}" font-size="11" text-anchor="middle">epoch</text>
<text x="12" y="${TOP + plotH / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 12 ${TOP + plotH / 2})">${esc(c.yLabel)}</text>
${marker}${lines.join("")}${legend}</svg>`;
}
