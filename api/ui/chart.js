// A small SVG line chart: a few series, axes with ticks, a legend, horizontal reference lines and
// a vertical marker (the selected checkpoint). It redraws at its container's width, so text stays
// legible from a phone to a desktop.

import { h } from "./dom.js";

const NS = "http://www.w3.org/2000/svg";

/** Okabe–Ito colours: distinguishable with the common colour-vision deficiencies. */
export const PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#7F7F7F", "#000000"];
export const DASHES = { solid: null, dashed: "7 4", dotted: "2 4" };

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  el.append(...children.filter((c) => c !== null && c !== undefined));
  return el;
}

/** About `count` round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten). */
export function ticks(lo, hi, count = 5, integer = false) {
  const span = hi - lo || 1;
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 5, 10].map((m) => m * mag).find((st) => st >= raw) || 10 * mag;
  if (integer) step = Math.max(1, Math.round(step));
  const out = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + 1e-9 * span; v += step) out.push(+v.toFixed(10));
  return out;
}

function extent(spec) {
  const xs = [];
  const ys = [];
  for (const ser of spec.series) for (const [x, y] of ser.points) { xs.push(x); ys.push(y); }
  for (const r of spec.refs || []) ys.push(r.y);
  if (spec.marker) xs.push(spec.marker.x);
  let [x0, x1] = xs.length ? [Math.min(...xs), Math.max(...xs)] : [0, 1];
  if (spec.xMin !== undefined) x0 = Math.min(x0, spec.xMin);
  if (spec.xMax !== undefined) x1 = Math.max(x1, spec.xMax);
  if (x0 === x1) { x0 -= spec.xInteger ? 1 : Math.abs(x0) * 0.1 || 1; x1 += spec.xInteger ? 1 : Math.abs(x1) * 0.1 || 1; }
  // Accuracies: zoom to the data in steps of 10 %, never beyond [0, 1].
  let [y0, y1] = [0, 1];
  if (ys.length) {
    y0 = Math.max(0, Math.floor((Math.min(...ys) - 0.04) * 10) / 10);
    y1 = Math.min(1, Math.ceil((Math.max(...ys) + 0.04) * 10) / 10);
  }
  return { x0, x1, y0, y1 };
}

function draw(spec, width) {
  const height = Math.round(Math.min(340, Math.max(210, width * 0.48)));
  const m = { left: 64, right: 14, top: 22, bottom: 42 };
  const { x0, x1, y0, y1 } = extent(spec);
  const px = (x) => m.left + ((x - x0) / (x1 - x0)) * (width - m.left - m.right);
  const py = (y) => height - m.bottom - ((y - y0) / (y1 - y0)) * (height - m.top - m.bottom);
  const fx = spec.xFormat || ((v) => `${v}`);
  const fy = spec.yFormat || ((v) => `${Math.round(v * 100)} %`);

  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": spec.title || "chart", "data-chart": spec.id || "" });
  const grid = s("g", { class: "grid" });
  const axis = s("g", { class: "axis" });
  for (const v of ticks(y0, y1, Math.max(5, Math.round(height / 50)))) {
    grid.append(s("line", { x1: m.left, x2: width - m.right, y1: py(v), y2: py(v) }));
    axis.append(s("text", { x: m.left - 6, y: py(v), "text-anchor": "end", "dominant-baseline": "middle" }, fy(v)));
  }
  for (const v of ticks(x0, x1, Math.max(2, Math.round(width / 90)), spec.xInteger)) {
    grid.append(s("line", { x1: px(v), x2: px(v), y1: m.top, y2: height - m.bottom }));
    axis.append(s("text", { x: px(v), y: height - m.bottom + 16, "text-anchor": "middle" }, fx(v)));
  }
  axis.append(
    s("line", { class: "frame", x1: m.left, x2: width - m.right, y1: height - m.bottom, y2: height - m.bottom }),
    s("text", { class: "label", x: (m.left + width - m.right) / 2, y: height - 6, "text-anchor": "middle" }, spec.xLabel || ""),
    s("text", { class: "label", x: 13, y: (m.top + height - m.bottom) / 2, "text-anchor": "middle", transform: `rotate(-90 13 ${(m.top + height - m.bottom) / 2})` }, spec.yLabel || ""),
  );
  svg.append(grid, axis);

  for (const r of spec.refs || []) {
    const y = py(r.y);
    svg.append(s("g", { class: "ref", "data-name": r.name, "data-y": r.y },
      s("line", { x1: m.left, x2: width - m.right, y1: y, y2: y, stroke: r.color, "stroke-dasharray": DASHES.dotted, "stroke-width": 1.5 }),
      r.label === false ? null : s("text", { x: width - m.right - 4, y: y - 5, "text-anchor": "end", fill: r.color }, `${r.name} ${fy(r.y)}`)));
  }

  if (spec.marker) {
    const x = px(spec.marker.x);
    svg.append(s("g", { class: "marker", "data-x": spec.marker.x },
      s("line", { x1: x, x2: x, y1: m.top - 4, y2: height - m.bottom }),
      s("text", { x: Math.min(Math.max(x, m.left + 40), width - m.right - 40), y: m.top - 8, "text-anchor": "middle" }, spec.marker.label)));
  }

  for (const ser of spec.series) {
    const pts = ser.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    const g = s("g", { class: "series", "data-name": ser.name, "data-n": pts.length, fill: ser.color, stroke: ser.color });
    if (pts.length > 1) {
      g.append(s("path", { d: pts.map(([x, y], i) => `${i ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(""), fill: "none", "stroke-width": 2.2, "stroke-dasharray": DASHES[ser.dash] || null, "stroke-linejoin": "round" }));
    }
    for (const [x, y] of pts) {
      const selected = spec.marker && x === spec.marker.x;
      g.append(s("circle", { cx: px(x), cy: py(y), r: selected ? 5 : 3.5, class: selected ? "selected" : null, "data-x": x, "data-y": y },
        s("title", {}, `${ser.name} · ${spec.xName || "x"} ${fx(x)}: ${fy(y)}`)));
    }
    svg.append(g);
  }
  if (!spec.series.some((ser) => ser.points.length)) {
    svg.append(s("text", { class: "empty", x: (m.left + width - m.right) / 2, y: (m.top + height - m.bottom) / 2, "text-anchor": "middle" }, spec.empty || "no data yet"));
  }
  return svg;
}

function legend(spec) {
  const swatch = (color, dash) => {
    const sw = s("svg", { width: 26, height: 10, "aria-hidden": "true" });
    sw.append(s("line", { x1: 1, x2: 25, y1: 5, y2: 5, stroke: color, "stroke-width": 2.5, "stroke-dasharray": DASHES[dash] || null }));
    return sw;
  };
  if (spec.legend) return h("ul", { class: "legend" }, spec.legend.map((l) => h("li", {}, swatch(l.color, l.dash), l.name)));
  return h("ul", { class: "legend" },
    spec.series.map((ser) => h("li", {}, swatch(ser.color, ser.dash), ser.name)),
    (spec.refs || []).map((r) => h("li", {}, swatch(r.color, "dotted"), r.name)),
    spec.marker ? h("li", {}, h("span", { class: "marker-swatch" }), spec.marker.legend || spec.marker.label) : null);
}

/**
 * A chart element for `spec` (see draw); `el.update(spec)` redraws it in place with new data.
 * spec: {series: [{name, points: [[x, y]], color, dash}], refs: [{name, y, color}],
 *        marker: {x, label, legend}, xLabel, yLabel, xName, xFormat, yFormat, xInteger, xMin, xMax, empty, id,
 *        legend: [{name, color, dash}] to replace the one-entry-per-series legend}
 */
export const lineChart = (spec) => chartFigure(spec, draw, legend);

/**
 * A <figure> that draws `spec` with drawFn(spec, width) at its container's width (again when that
 * changes) above legendFn(spec); `fig.update(spec)` redraws it with new data. Other charts
 * (frontier.js) share it.
 */
export function chartFigure(spec, drawFn, legendFn, className = "chart") {
  const plot = h("div", { class: "plot" });
  const fig = h("figure", { class: className }, plot, legendFn(spec));
  let width = 0;
  const render = () => plot.replaceChildren(drawFn(spec, width));
  new ResizeObserver(([entry]) => {
    const w = Math.floor(entry.contentRect.width);
    if (w > 0 && w !== width) { width = w; render(); }
  }).observe(plot);
  fig.update = (next) => {
    spec = next;
    fig.lastChild.replaceWith(legendFn(spec));
    if (width) render();
  };
  return fig;
}
