// The accuracy–robustness frontier: clean accuracy (x) against W2 robust accuracy (y), one point per
// fine-tune with its 95 % intervals as whiskers. Pareto-optimal points are filled, dominated ones
// hollow, the recommended one ringed; a grey dot joined to a point is the input model at that δ.
// Used by a sweep's page and by the compare page (several groups, one colour each).

import { chartFigure, DASHES, PALETTE, ticks } from "./chart.js";
import { h } from "./dom.js";
import { accuracyOf, fmtDelta } from "./results.js";

const NS = "http://www.w3.org/2000/svg";
const GREY = PALETTE[6];

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  el.append(...children.filter((c) => c !== null && c !== undefined));
  return el;
}

/** {x, y, xCi, yCi} of a block of numbers (a result's `after`, a frontier point), or null without both. */
export function cleanVsW2(block) {
  const clean = accuracyOf(block, "clean_accuracy");
  const w2 = accuracyOf(block, "w2_robust_accuracy");
  return clean && w2 ? { x: clean.value, y: w2.value, xCi: clean.ci95, yCi: w2.ci95 } : null;
}

const NAMES = { delta: "δ", beta: "β", attack_schedule: "schedule" };
const shown = (k, v) => (k === "delta" ? fmtDelta(v) : `${v}`);

/** What a child was fine-tuned with, in words: "δ = 0.1, β = 6". */
export const valuesText = (values) => Object.entries(values || {}).map(([k, v]) => `${NAMES[k] || k} = ${shown(k, v)}`).join(", ");

/** A sweep's lists in words: "δ: 0.05, 0.1, 0.2; β: 3, 6". */
export const sweptText = (sweep) => Object.entries(sweep || {}).filter(([, vs]) => Array.isArray(vs))
  .map(([k, vs]) => `${NAMES[k] || k}: ${vs.map((v) => shown(k, v)).join(", ")}`).join("; ");

/**
 * A sweep's fine-tunes as rows to draw: from its result once it ended (Pareto, rule, recommendation),
 * else from its child jobs (`children`) as they are now.
 */
export function sweepPoints(sweep, children = []) {
  const axes = Object.keys(sweep.config?.sweep || { delta: 1 });
  const values = (get) => Object.fromEntries(axes.map((k) => [k, get(k)]));
  const rows = Array.isArray(sweep.result?.points)
    ? sweep.result.points.map((p) => ({ id: p.job_id, status: p.status, numbers: p, before: p.before, pareto: !!p.pareto,
      satisfies: !!p.satisfies_rule, recommended: !!p.recommended, clean_drop: p.clean_drop, values: values((k) => p[k]) }))
    : children.map((c) => {
      const r = c.status === "succeeded" ? c.result || {} : {};
      const [b, a] = [accuracyOf(r.before, "clean_accuracy"), accuracyOf(r.after, "clean_accuracy")];
      return { id: c.id, status: c.status, progress: c.progress, numbers: r.after || null, before: r.before || null, pareto: null, satisfies: null,
        recommended: false, clean_drop: a && b ? b.value - a.value : null,
        values: values((k) => (k === "delta" ? c.threat_model?.delta : c.config?.[k])) };
    });
  return rows.map((r) => ({ ...r, label: valuesText(r.values), point: cleanVsW2(r.numbers), input: cleanVsW2(r.before) }));
}

function extent(groups, refs) {
  const xs = [];
  const ys = [];
  for (const g of groups) {
    for (const p of g.points) {
      for (const q of [p, p.input].filter(Boolean)) {
        xs.push(q.x, ...(q.xCi || []));
        ys.push(q.y, ...(q.yCi || []));
      }
    }
  }
  for (const r of refs) xs.push(r.x);
  const round = (lo, hi) => (lo === undefined ? [0, 1] : [Math.max(0, Math.floor((lo - 0.02) * 10) / 10), Math.min(1, Math.ceil((hi + 0.02) * 10) / 10)]);
  const [x0, x1] = round(xs.length ? Math.min(...xs) : undefined, Math.max(...xs));
  const [y0, y1] = round(ys.length ? Math.min(...ys) : undefined, Math.max(...ys));
  return { x0, x1: x1 > x0 ? x1 : x0 + 0.1, y0, y1: y1 > y0 ? y1 : y0 + 0.1 };
}

function draw(spec, width) {
  const height = Math.round(Math.min(380, Math.max(240, width * 0.55)));
  const m = { left: 64, right: 18, top: 24, bottom: 42 };
  const refs = spec.refs || [];
  const { x0, x1, y0, y1 } = extent(spec.groups, refs);
  const px = (x) => m.left + ((x - x0) / (x1 - x0)) * (width - m.left - m.right);
  const py = (y) => height - m.bottom - ((y - y0) / (y1 - y0)) * (height - m.top - m.bottom);
  const f = (v) => `${Math.round(v * 100)} %`;
  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": spec.title || "clean against W2 robust accuracy, one point per model", "data-chart": spec.id || "frontier" });
  const grid = s("g", { class: "grid" });
  const axis = s("g", { class: "axis" });
  for (const v of ticks(y0, y1, 5)) {
    grid.append(s("line", { x1: m.left, x2: width - m.right, y1: py(v), y2: py(v) }));
    axis.append(s("text", { x: m.left - 6, y: py(v), "text-anchor": "end", "dominant-baseline": "middle" }, f(v)));
  }
  for (const v of ticks(x0, x1, Math.max(2, Math.round(width / 90)))) {
    grid.append(s("line", { x1: px(v), x2: px(v), y1: m.top, y2: height - m.bottom }));
    axis.append(s("text", { x: px(v), y: height - m.bottom + 16, "text-anchor": "middle" }, f(v)));
  }
  const midY = (m.top + height - m.bottom) / 2;
  axis.append(
    s("line", { class: "frame", x1: m.left, x2: width - m.right, y1: height - m.bottom, y2: height - m.bottom }),
    s("text", { class: "label", x: (m.left + width - m.right) / 2, y: height - 6, "text-anchor": "middle" }, "clean accuracy (test split)"),
    s("text", { class: "label", x: 13, y: midY, "text-anchor": "middle", transform: `rotate(-90 13 ${midY})` }, "W2 robust accuracy at the point's δ"));
  svg.append(grid, axis);
  for (const r of refs) {
    svg.append(s("g", { class: "ref", "data-name": r.name, "data-x": r.x },
      s("line", { x1: px(r.x), x2: px(r.x), y1: m.top, y2: height - m.bottom, stroke: r.color || GREY, "stroke-dasharray": DASHES.dashed, "stroke-width": 1.3 }),
      s("text", { x: px(r.x) + 4, y: m.top + 10, fill: r.color || GREY, "font-size": 11 }, r.name)));
  }
  const rings = s("g", { class: "rings" });
  const labelled = [];   // the boxes of the labels drawn so far: a label that would overlap one is left out
  const room = (x, y, w) => {
    if (labelled.some((b) => x < b.x + b.w && b.x < x + w && Math.abs(b.y - y) < 12)) return false;
    labelled.push({ x, y, w });
    return true;
  };
  for (const g of spec.groups) {
    const pts = g.points.filter((p) => p.x !== undefined && Number.isFinite(p.x) && Number.isFinite(p.y));
    const el = s("g", { class: "series", "data-name": g.name, "data-n": pts.length, fill: g.color, stroke: g.color });
    for (const p of pts) {
      const [cx, cy] = [px(p.x), py(p.y)];
      const dot = s("g", { class: "point", "data-job": p.id, "data-x": p.x, "data-y": p.y, "data-pareto": p.pareto ?? "",
        "data-recommended": p.recommended ? "true" : "false" });
      if (p.input) {
        dot.append(s("line", { x1: px(p.input.x), y1: py(p.input.y), x2: cx, y2: cy, stroke: GREY, "stroke-dasharray": DASHES.dotted, "stroke-width": 1.2 }),
          s("circle", { class: "input", cx: px(p.input.x), cy: py(p.input.y), r: 3, fill: GREY, stroke: "none" },
            s("title", {}, `input model at ${p.label}: clean ${f(p.input.x)}, W2 ${f(p.input.y)}`)));
      }
      if (p.xCi) dot.append(s("line", { x1: px(p.xCi[0]), x2: px(p.xCi[1]), y1: cy, y2: cy, "stroke-width": 1.2, opacity: 0.6 }));
      if (p.yCi) dot.append(s("line", { x1: cx, x2: cx, y1: py(p.yCi[0]), y2: py(p.yCi[1]), "stroke-width": 1.2, opacity: 0.6 }));
      dot.append(s("circle", { cx, cy, r: 5, "stroke-width": 2, "fill-opacity": p.pareto === false ? 0.12 : 1 },
        s("title", {}, `${g.name} · ${p.label}: clean ${f(p.x)}, W2 ${f(p.y)}${p.pareto ? " · Pareto-optimal" : ""}${p.recommended ? " · recommended" : ""}`)));
      // the ring goes on top of every point (another item's point may sit on the recommended one)
      if (p.recommended) rings.append(s("circle", { class: "recommended", "data-job": p.id, cx, cy, r: 10, fill: "none", stroke: g.color, "stroke-width": 2 }));
      const text = p.recommended ? `${p.label} · recommended` : p.label;
      const tx = cx + (p.recommended ? 13 : 8);
      if (spec.labels !== false && p.label && room(tx, cy - 7, 6.5 * text.length)) {
        dot.append(s("text", { x: tx, y: cy - 7, stroke: "none", "font-size": 11 }, text));
      }
      el.append(dot);
    }
    svg.append(el);
  }
  svg.append(rings);
  if (!spec.groups.some((g) => g.points.length)) {
    svg.append(s("text", { class: "empty", x: (m.left + width - m.right) / 2, y: midY, "text-anchor": "middle" }, spec.empty || "no points yet"));
  }
  return svg;
}

function legend(spec) {
  const dot = (color, opacity = 1, ring = false) => {
    const sw = s("svg", { width: 24, height: 24, "aria-hidden": "true" });
    sw.append(s("circle", { cx: 12, cy: 12, r: 5, fill: color, stroke: color, "stroke-width": 2, "fill-opacity": opacity }));
    if (ring) sw.append(s("circle", { cx: 12, cy: 12, r: 10, fill: "none", stroke: color, "stroke-width": 2 }));
    return sw;
  };
  const ink = spec.groups.length === 1 ? spec.groups[0].color : GREY;
  return h("ul", { class: "legend" },
    spec.groups.length > 1 ? spec.groups.map((g) => h("li", {}, dot(g.color), g.name)) : null,
    h("li", {}, dot(ink), "Pareto-optimal"), h("li", {}, dot(ink, 0.12), "dominated"),
    spec.groups.some((g) => g.points.some((p) => p.recommended)) ? h("li", {}, dot(ink, 1, true), "recommended") : null,
    spec.groups.some((g) => g.points.some((p) => p.input)) ? h("li", {}, dot(GREY), "input model at the same δ") : null,
    (spec.refs || []).map((r) => h("li", {}, h("span", { class: "marker-swatch" }), r.legend || r.name)));
}

/**
 * A frontier chart for `spec`; `el.update(spec)` redraws it with new data.
 * spec: {id, groups: [{name, color, points: [{id, label, x, y, xCi, yCi, pareto, recommended, input: {x, y}}]}],
 *        refs: [{x, name, legend, color}] (vertical lines), labels (false: no text beside the points), empty}
 */
export const frontierChart = (spec) => chartFigure(spec, draw, legend, "chart frontier");

/** A group for frontierChart from sweepPoints' rows. */
export const sweepGroup = (name, color, rows) => ({
  name, color, points: rows.filter((r) => r.point).map((r) => ({ id: r.id, label: r.label, ...r.point, pareto: r.pareto,
    recommended: r.recommended, input: r.input })),
});
