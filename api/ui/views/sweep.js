// A sweep job's page: its fine-tunes as they run and end, the frontier (clean against W2 robust
// accuracy, one point per child with its intervals, Pareto-optimal ones filled, the recommended one
// ringed), the rule and the choice in words, and promoting a child's best checkpoint to a model.
// Loaded on demand by the job page (views/job.js) when the job is a sweep.

import * as api from "../api.js";
import { PALETTE } from "../chart.js";
import { badge, card, errorNote, every, fill, h, link, note, numHead, pct, points, progressBar, short, swap, table } from "../dom.js";
import { frontierChart, sweepGroup, sweepPoints, sweptText } from "../frontier.js";
import { accuracyOf, epochMetrics, intervalText, progressOf, threatText } from "../results.js";

const ACTIVE = new Set(["queued", "running", "cancelling"]);
const MAXIMIZE = { w2: "W2 robust accuracy", linf: "l∞ robust accuracy", l2: "l2 robust accuracy", clean: "clean accuracy",
  corruption: "mean corruption accuracy", delta: "radius δ" };

/** The rule in words, from the sweep's config (the result's rule_text once it has ended). */
export function ruleText(rule) {
  if (!rule) return "—";
  const limit = rule.max_clean_drop === null || rule.max_clean_drop === undefined
    ? "with no limit on the clean accuracy" : `whose clean accuracy dropped by at most ${points(rule.max_clean_drop).slice(1)} from the input model's`;
  return `the fine-tune with the highest ${MAXIMIZE[rule.maximize] || rule.maximize} ${limit}`;
}

export async function sweepView(root, { job, signal }) {
  const id = job.id;
  const state = { job, children: [], promoted: new Map() };
  const model = (await api.modelIndex([job.model_id])).get(job.model_id);
  const head = h("div", { class: "job-head" });
  const alerts = h("div");
  const chart = frontierChart({ id: "frontier", groups: [], empty: "each fine-tune appears here when it finishes" });
  const verdict = h("div", { id: "recommendation-box" });
  const caption = h("p", { class: "caption" });
  const kids = h("div");
  const promoted = h("div", { id: "promote-result" });
  fill(root,
    h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "← Jobs")),
    head, alerts,
    card("Frontier: clean against robust accuracy", chart, caption, verdict, promoted),
    card("Fine-tunes", kids),
    card("Configuration", h("details", {}, h("summary", {}, "The children's recipe, the swept values and the rule"),
      h("pre", { class: "config" }, JSON.stringify({ threat_model: job.threat_model, config: job.config, seed: job.seed }, null, 2)))));

  const promote = async (childId, button) => {
    button.disabled = true;
    try {
      const m = await api.post(`v1/jobs/${childId}/promote`);
      state.promoted.set(childId, m);
      promoted.replaceChildren(note("info", h("strong", {}, "Promoted: "), `the best checkpoint of ${short(childId)} is model `,
        h("span", { class: "mono", id: "promoted-model", "data-model": m.id, "data-job": childId }, m.id),
        ` (${m.status}). `, link("#/models", "See the models"), " or ", link(`#/new?type=evaluate&model=${m.id}`, "evaluate it"), "."));
      drawChildren();
    } catch (err) {
      promoted.replaceChildren(errorNote(err));
    } finally {
      button.disabled = false;
    }
  };
  const promoteButton = (childId, primary = false) => h("button", {
    type: "button", class: primary ? "primary" : "small", "data-promote": childId, id: primary ? "promote-recommended" : null,
    onclick: (e) => promote(childId, e.currentTarget),
  }, primary ? "Promote the recommended fine-tune to a model" : "Promote");

  const [top, facts, bar, status] = [h("div"), h("div"), h("div"), h("div")];
  head.append(top, facts, bar, status);
  const drawHead = () => {
    const j = state.job;
    const p = progressOf(j);
    // parts with buttons are rebuilt only when what they show changes, so a click is never lost
    swap(top, j.status, () => h("div", { class: "page-head" }, h("h1", {}, "Sweep ", h("span", { class: "mono" }, j.id)),
      h("div", { class: "head-actions" }, badge(j.status), ACTIVE.has(j.status) && j.status !== "cancelling"
        ? h("button", { type: "button", class: "danger", id: "cancel-job", onclick: () => cancel() }, "Cancel sweep") : null)));
    swap(facts, j.id, () => h("dl", { class: "facts" },
      fact("Model", model ? `${model.name || ""} (${model.id})` : j.model_id), fact("Data set", j.dataset),
      // the radii are the swept ones when δ is swept
      fact("Threat model", threatText(j.config?.sweep?.delta ? { kind: j.threat_model?.kind } : j.threat_model)),
      fact("Swept", sweptText(j.config?.sweep)),
      fact("Rule", ruleText(j.config?.recommend))));
    bar.replaceChildren(progressBar(p.fraction, `${Math.round(100 * p.fraction)} %${p.text ? ` · ${p.text}` : ""}`));
    swap(status, [j.status, j.error], () => [
      j.error ? note("error", h("strong", {}, `${j.error.code || "error"}: `), j.error.message || "") : null,
      j.status === "cancelling" ? note("info", "Cancelling: each running fine-tune stops at its next check; the queued ones never start.") : null]);
  };

  const drawFrontier = (rows) => {
    const inputClean = rows.map((r) => r.input?.x).find((x) => typeof x === "number");
    const rule = state.job.config?.recommend;
    const refs = typeof inputClean === "number" && typeof rule?.max_clean_drop === "number"
      ? [{ x: inputClean - rule.max_clean_drop, name: "rule's limit", legend: `the rule's limit: clean accuracy at least ${pct(inputClean - rule.max_clean_drop)}` }] : [];
    chart.update({ id: "frontier", groups: [sweepGroup("fine-tunes", PALETTE[0], rows)], refs, empty: "each fine-tune appears here when it finishes" });
    caption.replaceChildren(`One point per fine-tune that finished: its returned model's clean and W2 robust accuracy on the test split at its own δ, `
      + "with 95 % intervals as whiskers; the grey dot joined to it is the input model at the same δ. "
      + (state.job.result?.pareto_objectives?.length
        ? `Filled points are Pareto-optimal (no other fine-tune is at least as good on ${state.job.result.pareto_objectives.join(", ")} and better on one).`
        : "The Pareto-optimal points and the recommendation are marked when every fine-tune has ended."));
    const rec = state.job.result?.recommendation;
    swap(verdict, [rec, state.job.status], () => {
      if (!rec) return h("p", { class: "muted" }, `The rule: ${ruleText(state.job.config?.recommend)}.`);
      return [note(rec.job_id ? "info" : "warn", h("strong", {}, rec.job_id ? "Recommended: " : "No recommendation: "),
        h("span", { id: "recommendation", "data-job": rec.job_id || "" }, rec.reason || "")),
      h("p", { class: "caption", id: "rule" }, `The rule: ${rec.rule_text || ruleText(rec.rule)}. `,
        `${(rec.satisfied_by || []).length} of ${rows.length} fine-tunes satisfy it.`),
      rec.job_id ? h("div", { class: "actions" }, promoteButton(rec.job_id, true), link(`#/jobs/${rec.job_id}`, "Open the recommended fine-tune")) : null];
    });
  };

  const drawChildren = () => {
    const rows = sweepPoints(state.job, state.children);
    drawFrontier(rows);
    const metrics = epochMetrics(state.job.threat_model);
    const corr = rows.some((r) => accuracyOf(r.numbers, "corruption_accuracy"));
    const cell = (acc) => h("td", { class: "num" }, pct(acc?.value), acc?.ci95 ? h("span", { class: "ci" }, intervalText(acc.ci95)) : null);
    const yes = (v) => (v === null ? "—" : v ? "yes" : "no");
    swap(kids, [rows, [...state.promoted.keys()]], () => table(
      ["Fine-tune", "Status", ...metrics.map((m) => numHead(m.label)), corr ? numHead("Corruptions") : null, numHead("Clean change"),
        "Pareto", "Rule", ""].filter(Boolean),
      rows.map((r) => h("tr", { "data-job": r.id, "data-status": r.status, class: r.recommended ? "selected" : null },
        h("th", {}, link(`#/jobs/${r.id}`, r.label || short(r.id)), r.recommended ? h("span", { class: "tag" }, "recommended") : null,
          h("small", { class: "ci" }, short(r.id))),
        h("td", {}, badge(r.status), ACTIVE.has(r.status) && r.progress ? progressNote(r) : null),
        metrics.map((m) => cell(accuracyOf(r.numbers, m.key))),
        corr ? cell(accuracyOf(r.numbers, "corruption_accuracy")) : null,
        h("td", { class: "num" }, typeof r.clean_drop === "number" ? points(-r.clean_drop) : "—"),
        h("td", { "data-pareto": r.pareto ?? "" }, yes(r.pareto)), h("td", {}, yes(r.satisfies)),
        h("td", {}, r.status === "succeeded"
          ? (state.promoted.has(r.id) ? link("#/models", `model ${short(state.promoted.get(r.id).id)}`) : promoteButton(r.id)) : null))),
      { id: "sweep-children" }));
  };

  const cancel = async () => {
    if (!confirm(`Cancel sweep ${id} and every fine-tune of it that has not ended?`)) return;
    try {
      state.job = await api.post(`v1/jobs/${id}/cancel`);
      drawHead();
    } catch (err) {
      alerts.replaceChildren(errorNote(err));
    }
  };

  const load = async () => {
    const [j, page] = await Promise.all([api.get(`v1/jobs/${id}`, null, signal),
      api.get("v1/jobs", { parent_job_id: id, limit: 100 }, signal)]);
    state.job = j;
    state.children = (page.data || []).slice().sort((a, b) => (a.created_at < b.created_at ? -1 : a.created_at > b.created_at ? 1 : 0));
  };
  let last = null;
  await every(2000, async () => {
    if (last && !ACTIVE.has(last)) return;   // ended: nothing changes any more
    await load();
    last = state.job.status;
    drawHead();
    drawChildren();
  }, signal, (err) => alerts.replaceChildren(errorNote(err)));
}

/** A running fine-tune's progress in words, "40 % · epoch 1/2 · train", cut short (whole on hovering). */
function progressNote(row) {
  const p = progressOf({ status: row.status, progress: row.progress });
  const text = `${Math.round(100 * p.fraction)} %${p.text ? ` · ${p.text}` : ""}`;
  return h("small", { class: "ci", title: text }, text.length > 40 ? `${text.slice(0, 39)}…` : text);
}

const fact = (term, value) => [h("dt", {}, term), h("dd", {}, value)];
