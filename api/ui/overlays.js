// What the compare page overlays besides the robustness-against-δ curves: the frontier points
// (clean against W2 robust accuracy; a sweep contributes one point per fine-tune) and the
// common-corruption profile (accuracy per corruption type, when the reports have it), with a
// warning when the picked items are not on the same data set. Loaded when the compare page draws.

import * as api from "./api.js";
import { PALETTE } from "./chart.js";
import { card, h, link, note, pct, short, table } from "./dom.js";
import { cleanVsW2, frontierChart, sweepGroup, sweepPoints, sweptText } from "./frontier.js";
import { fmtDelta, intervalText } from "./results.js";

const isBlock = (b) => b && typeof b === "object" && Array.isArray(b.per_type);

/**
 * The frontier point and corruption block of a block of numbers (an evaluation report's summary, a
 * fine-tune's `before` or `after`): {frontier: [point], corruptions, dataset}. `input`: the input
 * model's point, joined to this one on the chart.
 */
export function overlayOf(numbers, { delta, corruptions, dataset, input = null, id }) {
  const p = cleanVsW2(numbers);
  const d = numbers?.delta ?? delta;
  return { dataset, corruptions: isBlock(corruptions) ? corruptions : null,
    frontier: p ? [{ id, label: typeof d === "number" ? `δ = ${fmtDelta(d)}` : "", ...p, input: input ? cleanVsW2(input) : null }] : [] };
}

/** A sweep as a compare entry: its fine-tunes as frontier points (Pareto and recommendation marked). */
export async function sweepEntry(job, name) {
  const kids = job.result?.points ? [] : (await api.get("v1/jobs", { parent_job_id: job.id, limit: 100 })).data || [];
  const rows = sweepPoints(job, kids);
  return { id: job.id, label: `${name} sweep (${short(job.id)})`, dataset: job.dataset, sweep: true, frontier: sweepGroup("", "", rows).points,
    source: link(`#/jobs/${job.id}`, `sweep ${short(job.id)}`), missing: `a sweep over ${sweptText(job.config?.sweep)}: its fine-tunes are on the frontier chart`,
    corruptions: null };
}

/** A note when the entries with numbers are on different data sets (their numbers do not compare). */
export function datasetNote(entries, name = (d) => d) {
  const sets = [...new Set(entries.filter((e) => e.dataset && (e.curves?.length || e.frontier?.length)).map((e) => e.dataset))];
  return sets.length > 1 ? note("warn", h("span", { id: "compare-datasets", "data-datasets": sets.join(",") },
    `These are measured on different data sets (${sets.map(name).join(", ")}): their numbers do not compare. Pick items of one data set.`)) : null;
}

/** The frontier card: every entry's points, one colour per entry (as on the curves). */
export function frontierCard(entries, colourOf) {
  const groups = entries.filter((e) => e.frontier?.length).map((e) => ({ name: e.label, color: colourOf(e), points: e.frontier }));
  if (!groups.length) return null;
  return card("Frontier: clean against robust accuracy",
    frontierChart({ id: "compare-frontier", groups, labels: groups.length <= 3 }),
    h("p", { class: "caption" }, "Each point is a model's clean and W2 robust accuracy on the test split at the δ it names, with 95 % intervals as whiskers: ",
      "an evaluation at its headline δ, a fine-tune's input and returned models, a sweep's fine-tunes (filled: Pareto-optimal ",
      "within the sweep; ringed: recommended by its rule; grey: its input model at the same δ). Robust accuracies at different δ do not compare directly."));
}

/** The corruption profile: accuracy per corruption type (the mean over its measured severities) for each entry that has it. */
export function corruptionProfileCard(entries, colourOf) {
  const shown = entries.filter((e) => e.corruptions);
  if (!shown.length) return null;
  const types = [...new Set(shown.flatMap((e) => e.corruptions.per_type.map((t) => t?.type)))].filter((t) => typeof t === "string");
  const bar = (value, colour) => h("div", { class: "corruption-bar", style: { width: `${Math.max(0, Math.min(1, value ?? 0)) * 100}%`,
    background: colour, height: "0.45em", borderRadius: "2px" } });
  const cell = (e, acc, ci) => h("td", { class: "num", "data-entry": e.id, "data-value": acc ?? "" }, pct(acc),
    ci ? h("span", { class: "ci" }, intervalText(ci)) : null, typeof acc === "number" ? bar(acc, colourOf(e)) : null);
  const rows = types.map((t) => h("tr", { "data-corruption": t }, h("th", {}, t.replaceAll("_", " ")),
    shown.map((e) => {
      const row = e.corruptions.per_type.find((r) => r?.type === t);
      return cell(e, row?.accuracy, row?.ci95);
    })));
  const mean = h("tr", { "data-corruption": "mean" }, h("th", {}, "Mean"),
    shown.map((e) => cell(e, e.corruptions.mean_accuracy, e.corruptions.mean_accuracy_ci95)));
  return card("Common corruptions",
    table(["Corruption", ...shown.map((e) => h("th", { class: "num" }, e.label))], [...rows, mean], { id: "compare-corruptions" }),
    h("p", { class: "caption" }, "Accuracy on corrupted copies of the test images: per type, the mean over its measured severities, ",
      "with its 95 % interval. Items whose report has no corruption evaluation are left out."));
}

/** Each entry's colour: the curves' (PALETTE by position among the entries with curves), then the rest's. */
export function colours(entries) {
  const order = [...entries.filter((e) => e.curves?.length), ...entries.filter((e) => !e.curves?.length && (e.frontier?.length || e.corruptions))];
  return (e) => PALETTE[Math.max(0, order.indexOf(e)) % PALETTE.length];
}
