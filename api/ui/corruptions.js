// The common-corruptions card of a job page: one row per corruption type, its accuracy as a bar
// (before and after for a fine-tune), the means, the input-relative mCE and the skipped cells.
// Bars are sized through the CSSOM (the page's CSP forbids style attributes).

import { PALETTE } from "./chart.js";
import { card, h, note, pct, points, table } from "./dom.js";
import { intervalText } from "./results.js";

const bar = (value, colour, label) => h("div", {
  class: "corruption-bar", title: label, "data-value": value ?? "",
  style: { width: `${Math.max(0, Math.min(1, value ?? 0)) * 100}%`, background: colour, height: "0.55em", margin: "1px 0", borderRadius: "2px" },
});

const cell = (acc) => h("td", { class: "num" }, acc ? pct(acc.value) : "—",
  acc?.ci95 ? h("span", { class: "ci", title: "95 % interval" }, intervalText(acc.ci95)) : null);

const ratio = (r) => (r ? `${r.value.toFixed(2)}${r.ci95 ? ` (95 %: ${r.ci95[0].toFixed(2)}–${r.ci95[1].toFixed(2)})` : ""}` : "—");

/** The card for corruptionsOf(job, report), or null when the job measured none. */
export function corruptionCard(c) {
  if (!c) return null;
  const two = c.before !== null;
  const [colourBefore, colourAfter] = [PALETTE[6], PALETTE[0]];
  const legend = two
    ? h("p", { class: "caption" }, "Mean accuracy over each type's measured severities: ",
      h("strong", { style: { color: colourBefore } }, "input model"), " and ", h("strong", { style: { color: colourAfter } }, "returned checkpoint"), ".")
    : h("p", { class: "caption" }, "Mean accuracy over each type's measured severities.");
  const rows = c.rows.map((r) => h("tr", { "data-corruption": r.type },
    h("td", {}, r.type.replaceAll("_", " "), r.after ? null : h("span", { class: "ci" }, " not measured")),
    h("td", { class: "corruption-bars", style: { minWidth: "12em", width: "40%" } },
      two ? bar(r.before?.value, colourBefore, `input model ${pct(r.before?.value)}`) : null,
      bar(r.after?.value, colourAfter, `${two ? "checkpoint" : "accuracy"} ${pct(r.after?.value)}`)),
    two ? cell(r.before) : null, cell(r.after)));
  const head = ["Corruption", "", ...(two ? ["Input model", "Checkpoint"] : ["Accuracy"])]
    .map((t, i) => (i >= 2 ? h("th", { class: "num" }, t) : h("th", {}, t)));
  const means = h("p", {},
    h("strong", {}, "Mean corruption accuracy: "),
    two ? [pct(c.before.mean?.value), " → "] : null, pct(c.after.mean?.value),
    c.after.mean?.ci95 ? ` (95 %: ${intervalText(c.after.mean.ci95)})` : "",
    c.change ? [" · change ", points(c.change.value), c.change.ci95 ? ` (${points(c.change.ci95[0])} to ${points(c.change.ci95[1])})` : ""] : null,
    c.mce ? [" · mCE against the input model ", h("span", { id: "corruption-mce" }, ratio(c.mce)), ", relative mCE ", ratio(c.relativeMce)] : null,
    c.examples !== null ? ` · ${c.examples} images` : "");
  const skipped = c.skipped.length
    ? h("details", { id: "corruptions-skipped" }, h("summary", {}, `${c.skipped.length} of ${c.asked ?? "the"} cells skipped (too small an image for them)`),
      h("ul", {}, c.skipped.map((s) => h("li", { "data-corruption": s.type, "data-severity": s.severity },
        h("strong", {}, `${String(s.type).replaceAll("_", " ")} ${s.severity}`), ": ", String(s.reason ?? "")))))
    : null;
  return card("Common corruptions", legend, means,
    table(head, rows, { id: "corruptions" }), skipped,
    c.compared && !c.mce ? note("info", "No mCE: the input model made no error under the measured corruptions.") : null);
}
