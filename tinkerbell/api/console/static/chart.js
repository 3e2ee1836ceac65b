// A dependency-free SVG line chart: one or more series of [x, y] points, nice ticks, last value in the caption.
import { el, fmtNum } from "./core.js";

const NS = "http://www.w3.org/2000/svg";
const W = 560, H = 220, L = 56, R = 12, T = 12, B = 30;
const COLORS = ["#2f5d8a", "#b3541e", "#3b7d3b", "#7a4a9a"];

function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function ticks(lo, hi, n = 5) {
  if (hi === lo) { hi = lo + 1; lo = lo - 1; }
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

// series: [{name, points: [[x, y], ...]}]; returns a <figure> whose data-* attributes summarise the first series.
export function lineChart(title, series, { xLabel = "step" } = {}) {
  const all = series.flatMap((s) => s.points).filter(([, y]) => Number.isFinite(y));
  const fig = el("figure", { class: "chart", "data-metric": title });
  const first = series[0] ? series[0].points : [];
  fig.dataset.count = String(first.length);
  if (first.length) {
    fig.dataset.first = String(first[0][1]);
    fig.dataset.last = String(first[first.length - 1][1]);
  }
  if (!all.length) {
    fig.append(el("figcaption", { text: `${title}: no data yet` }));
    return fig;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) x1 = x0 + 1;
  const yt = ticks(y0, y1);
  y0 = Math.min(y0, yt[0]); y1 = Math.max(y1, yt[yt.length - 1]);
  if (y0 === y1) y1 = y0 + 1;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const last = first.length ? first[first.length - 1][1] : null;
  const desc = `${title} over ${first.length} ${xLabel}s` + (last !== null ? `, last ${fmtNum(last)}` : "");
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": desc, class: "plot" });
  root.append(svg("title", {}, desc));
  const grid = svg("g", { class: "grid" });
  for (const v of yt) {
    grid.append(svg("line", { x1: L, x2: W - R, y1: sy(v), y2: sy(v) }));
    grid.append(svg("text", { x: L - 6, y: sy(v) + 4, "text-anchor": "end" }, fmtNum(v, 3)));
  }
  for (const v of ticks(x0, x1, 6).filter((v) => v >= x0 && v <= x1)) {
    grid.append(svg("text", { x: sx(v), y: H - B + 16, "text-anchor": "middle" }, fmtNum(v, 3)));
  }
  grid.append(svg("text", { x: W - R, y: H - 2, "text-anchor": "end" }, xLabel));
  root.append(grid);
  root.append(svg("path", { class: "axis", d: `M${L},${T}V${H - B}H${W - R}` }));
  series.forEach((s, i) => {
    const pts = s.points.filter(([, y]) => Number.isFinite(y));
    if (!pts.length) return;
    const d = pts.map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    root.append(svg("path", { class: "line", d, stroke: COLORS[i % COLORS.length] }));
    if (pts.length === 1) root.append(svg("circle", { cx: sx(pts[0][0]), cy: sy(pts[0][1]), r: 3, fill: COLORS[i % COLORS.length] }));
  });
  fig.append(root);
  const legend = series.length > 1
    ? series.map((s, i) => el("span", { class: `key k${i % COLORS.length}`, text: s.name }))
    : [];
  fig.append(el("figcaption", {}, el("strong", { text: title }), last !== null ? ` — last ${fmtNum(last)}` : "", " ", legend));
  return fig;
}
