// Compare models or jobs on one robustness-against-δ chart and one table, and (overlays.js) on the
// frontier of clean against robust accuracy and the common-corruption profile.
// A model is shown by its latest successful evaluation, an evaluation job by its report, a
// fine-tune by its input model and its selected checkpoint at the job's δ, a sweep by its fine-tunes.

import * as api from "../api.js";
import { lineChart, PALETTE } from "../chart.js";
import { card, errorNote, fill, h, link, note, numHead, pct, short, table } from "../dom.js";
import { finetunePoints, fmtDelta, fromClean, robustnessCurves } from "../results.js";

const KINDS = { finetune: "Fine-tune", evaluate: "Evaluation", sweep: "Sweep" };
const dashFor = (curve) => (curve.attack === "w-pgd" ? "solid" : curve.attack === "pgd" ? "dashed" : "dotted");

/** What one picked id contributes: entries {id, label, source, curves, clean, frontier, corruptions, dataset}. */
async function entriesFor(id, models) {
  const { overlayOf, sweepEntry } = await import("../overlays.js");
  const fromReport = (report, job, key) => overlayOf(report?.summary, { corruptions: report?.corruptions, dataset: job.dataset, id: key });
  if (id.startsWith("mdl_")) {
    const m = models.get(id);
    const name = m?.name || short(id);
    const evals = await api.get("v1/jobs", { type: "evaluate", model_id: id, status: "succeeded", limit: 1 });
    const job = evals.data?.[0];
    if (!job) return [{ id, label: name, missing: h("span", {}, "not evaluated yet: ", link(`#/new?type=evaluate&model=${id}`, "evaluate it")) }];
    const report = await api.get(`v1/jobs/${job.id}/report`);
    return [{ id, label: name, source: link(`#/jobs/${job.id}`, `evaluation ${short(job.id)}`), ...robustnessCurves(report), ...fromReport(report, job, id) }];
  }
  const job = await api.get(`v1/jobs/${id}`);
  const name = models.get(job.model_id)?.name || short(job.model_id);
  if (job.status !== "succeeded") return [{ id, label: `${name} (${short(id)})`, missing: `job ${job.status}: nothing to compare until it succeeds` }];
  if (job.type === "sweep") return [await sweepEntry(job, name)];
  if (job.type === "evaluate") {
    const report = await api.get(`v1/jobs/${id}/report`);
    return [{ id, label: `${name} (${short(id)})`, source: link(`#/jobs/${id}`, `evaluation ${short(id)}`), ...robustnessCurves(report), ...fromReport(report, job, id) }];
  }
  const pts = finetunePoints(job);
  if (!pts) return [{ id, label: short(id), missing: "this fine-tune has no before/after result" }];
  const src = () => link(`#/jobs/${id}`, `fine-tune ${short(id)}`);   // a node can stand in one place only
  const [before, after] = [job.result?.before, job.result?.after];
  const at = { delta: job.threat_model?.delta, dataset: job.dataset };
  return [
    { id: `${id}:before`, label: `${name} (input of ${short(id)})`, source: src(), ...pts.before,
      ...overlayOf(before, { ...at, corruptions: before?.corruptions, id: `${id}:before` }) },
    { id: `${id}:after`, label: `${name} fine-tuned (${short(id)})`, source: src(), ...pts.after,
      ...overlayOf(after, { ...at, corruptions: after?.corruptions, id: `${id}:after` }) },
  ];
}

export async function compareView(root, { params, signal }) {
  const picked = new Set((params.get("ids") || "").split(",").filter(Boolean));
  const [modelList, jobList] = await Promise.all([
    api.getAll("v1/models", {}, 200), api.getAll("v1/jobs", { status: "succeeded" }, 200),
  ]);
  const [models, datasets] = await Promise.all([
    api.modelIndex(jobList.map((j) => j.model_id)), api.datasetIndex(jobList.map((j) => j.dataset))]);
  const result = h("div", { id: "compare-result" });

  const box = (id, label, detail) => h("label", { class: "pick" },
    h("input", { type: "checkbox", value: id, checked: picked.has(id), onchange: (e) => toggle(id, e.target.checked) }),
    h("span", {}, label, detail ? h("small", {}, detail) : null));
  const toggle = (id, on) => {
    if (on) picked.add(id); else picked.delete(id);
    // The choice lives in the URL (shareable) without reloading the page.
    history.replaceState(null, "", `#/compare${picked.size ? `?ids=${[...picked].join(",")}` : ""}`);
    draw();
  };

  let drawing = 0;
  const draw = async () => {
    const mine = ++drawing;
    if (picked.size < 1) {
      result.replaceChildren(note("info", "Pick two or more models or jobs above."));
      return;
    }
    let entries;
    try {
      entries = (await Promise.all([...picked].map((id) => entriesFor(id, models)))).flat();
    } catch (err) {
      if (mine === drawing && !signal.aborted) result.replaceChildren(errorNote(err));
      return;
    }
    if (mine !== drawing || signal.aborted) return;   // a newer choice is being drawn
    const overlays = await import("../overlays.js");
    if (mine !== drawing || signal.aborted) return;
    fill(result, ...comparison(entries), overlays.datasetNote(entries), overlays.frontierCard(entries, overlays.colours(entries)),
      overlays.corruptionProfileCard(entries, overlays.colours(entries)));
  };

  fill(root, 
    h("div", { class: "page-head" }, h("h1", {}, "Compare")),
    h("p", { class: "muted" }, "Robust accuracy against the radius δ for several models or jobs, their clean against robust accuracy (the frontier) and, where the reports have it, ",
      "accuracy under common corruptions. A model is shown by its latest successful evaluation; a fine-tune by its input model and its selected checkpoint ",
      "at the job's δ; a sweep by its fine-tunes. Evaluate models at the same radii to compare them along a curve."),
    card("Pick", h("div", { class: "picker" },
      h("div", {}, h("h3", {}, "Models"), modelList.length
        ? modelList.map((m) => box(m.id, m.name || short(m.id), `${m.architecture} · ${m.dataset} · ${short(m.id)}`))
        : h("p", { class: "muted" }, "No models.")),
      h("div", {}, h("h3", {}, "Finished jobs"), jobList.length
        ? jobList.map((j) => box(j.id, `${KINDS[j.type] || j.type} ${short(j.id)}`,
          `${models.get(j.model_id)?.name || short(j.model_id)} · ${datasets.get(j.dataset)?.name || short(j.dataset)}`))
        : h("p", { class: "muted" }, "No finished jobs.")))),
    result);
  await draw();
}

function comparison(entries) {
  const shown = entries.filter((e) => e.curves?.length);
  const series = [];
  const refs = [];
  shown.forEach((e, i) => {
    const color = PALETTE[i % PALETTE.length];
    for (const c of e.curves) series.push({ name: `${e.label} · ${c.name}`, color, dash: dashFor(c), points: fromClean(c.points, e.clean) });
    if (e.clean !== null && e.clean !== undefined) refs.push({ name: `${e.label} · clean`, y: e.clean, color, label: false });
  });
  const deltas = [...new Set(shown.flatMap((e) => e.curves.flatMap((c) => c.points.map((p) => p[0]))))].sort((a, b) => a - b);
  const rows = entries.flatMap((e) => (e.curves?.length
    ? e.curves.map((c, k) => h("tr", { "data-entry": e.id, "data-attack": c.name },
      k === 0 ? h("th", { rowspan: e.curves.length }, e.label, h("small", {}, e.source || "")) : null,
      h("td", {}, c.name),
      h("td", { class: "num", "data-clean": "" }, pct(e.clean)),
      deltas.map((d) => h("td", { class: "num", "data-delta": d }, pct(c.points.find((p) => p[0] === d)?.[1])))))
    : [h("tr", { "data-entry": e.id }, h("th", {}, e.label), h("td", { colspan: deltas.length + 2, class: "muted" }, e.missing || "no data"))]));
  // One legend entry per item (its colour) and one per line style, instead of one per line.
  const grey = "#7F7F7F";
  const legend = [...shown.map((e, i) => ({ name: e.label, color: PALETTE[i % PALETTE.length] })),
    { name: "W2 robust (W-PGD)", color: grey }, { name: "pointwise PGD", color: grey, dash: "dashed" },
    { name: "clean accuracy", color: grey, dash: "dotted" }];
  return [
    card("Robust accuracy against δ", shown.length
      ? lineChart({ id: "compare", xLabel: "radius δ", yLabel: "accuracy", xName: "δ", xMin: 0, xFormat: fmtDelta, series, refs, legend })
      : note("info", "None of the picked items has robustness numbers yet.")),
    card("Table", table(["", "Attack", numHead("Clean"), ...deltas.map((d) => numHead(`δ = ${fmtDelta(d)}`))], rows, { id: "compare-table" })),
  ];
}
