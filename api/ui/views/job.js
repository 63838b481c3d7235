// One job: live progress, per-epoch curves (fine-tune) or robustness against δ (evaluation),
// the before/after table, checkpoints to download, the event log, cancel.

import * as api from "../api.js";
import { lineChart, PALETTE } from "../chart.js";
import { corruptionCard } from "../corruptions.js";
import { ago, badge, bytes, card, clock, duration, errorNote, every, fill, h, note, numHead, pct, points, progressBar, swap, table } from "../dom.js";
import {
  attackRows, auditOf, beforeAfter, epochHistory, epochMetrics, fmtDelta, fromClean, intervalText, perClassOf, presetOf, progressOf,
  robustnessCurves, selectedEpoch, threatText, verdictOf, corruptionsOf,
} from "../results.js";

const ACTIVE = new Set(["queued", "running", "cancelling"]);
const MAX_LOG = 400;

export async function jobView(root, { match, signal }) {
  const id = match[1];
  const state = { job: await api.get(`v1/jobs/${id}`, null, signal), events: [], checkpoints: [], report: null };
  if (state.job.type === "sweep") return (await import("./sweep.js")).sweepView(root, { job: state.job, signal });
  const model = (await api.modelIndex([state.job.model_id])).get(state.job.model_id);
  const finetune = state.job.type === "finetune";

  const head = h("div", { class: "job-head" });
  const problems = h("div");
  const alerts = h("div");   // failures of this page's own requests
  const log = h("ol", { class: "log", id: "event-log" });
  const logBox = h("div", { class: "log-box" }, log);
  const parts = {
    curves: h("div"), beforeAfter: h("div"), checkpoints: h("div"), evaluation: h("div"), audit: h("div"), perClass: h("div"), corruptions: h("div"),
  };
  const epochChart = finetune ? lineChart(epochSpec(state)) : null;
  fill(root,
    h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "← Jobs")),
    head, problems, alerts,
    finetune ? card("Validation accuracy per epoch", epochChart, parts.curves) : null,
    finetune ? parts.beforeAfter : parts.evaluation,
    parts.audit, parts.perClass, parts.corruptions,
    finetune ? parts.checkpoints : null,
    card("Events", logBox),
    card("Configuration", h("details", {}, h("summary", {}, "Recipe settings (defaults filled in by the server)"),
      h("pre", { class: "config" }, JSON.stringify({ threat_model: state.job.threat_model, config: state.job.config, seed: state.job.seed }, null, 2)))));

  // ------------------------------------------------------------------ drawing
  const top = h("div");
  const facts = h("div");
  const bar = h("div");
  head.append(top, facts, bar);
  const drawHead = () => {
    const { job } = state;
    const p = progressOf(job);
    const active = ACTIVE.has(job.status);
    // Parts with buttons are rebuilt only when what they show changes, so a click is never lost.
    swap(top, job.status, () => h("div", { class: "page-head" },
      h("h1", {}, finetune ? "Fine-tune " : "Evaluation ", h("span", { class: "mono" }, job.id)),
      h("div", { class: "head-actions" }, badge(job.status),
        active && job.status !== "cancelling"
          ? h("button", { type: "button", class: "danger", id: "cancel-job", onclick: () => cancelJob(state, drawAll) }, "Cancel job") : null)));
    swap(facts, [job.status, job.started_at, job.finished_at, job.attempt], () => h("dl", { class: "facts" },
      fact("Model", model ? `${model.name || ""} (${model.id})` : job.model_id),
      fact("Data set", job.dataset),
      job.parent_job_id ? fact("Part of", h("a", { href: `#/jobs/${job.parent_job_id}`, id: "parent-sweep" }, `sweep ${job.parent_job_id}`)) : null,
      fact("Threat model", threatText(job.threat_model)),
      fact("Created", ago(job.created_at)),
      job.started_at && job.finished_at ? fact("Ran for", duration((Date.parse(job.finished_at) - Date.parse(job.started_at)) / 1000)) : null,
      job.estimate ? fact("Estimated", estimateText(job.estimate)) : null,
      job.attempt > 1 ? fact("Attempt", `${job.attempt} of ${job.max_attempts}`) : null));
    bar.replaceChildren(progressBar(p.fraction, `${Math.round(100 * p.fraction)} %${p.text ? ` · ${p.text}` : ""}${active && p.eta !== null ? ` · about ${duration(p.eta)} left` : ""}`));
    swap(problems, [job.status, job.error, job.result?.improved, job.result?.verdict], () => [
      job.error ? note("error", h("strong", {}, `${job.error.code || "error"}: `), job.error.message || "") : null,
      job.status === "cancelling" ? note("info", "Cancelling: the worker stops at its next check and keeps the checkpoints written so far.") : null,
      // an older result (no verdict) says so only through `improved`; a verdict speaks for itself
      job.result?.improved === false && !job.result?.verdict ? note("warn", h("strong", {}, "No improvement. "),
        "No fine-tuned epoch beat the input model under the selection rule, so the checkpoint this job hands back is the input model itself.") : null]);
  };

  const drawCurves = () => {
    epochChart.update(epochSpec(state));
    const c = state.job.config || {};
    parts.curves.replaceChildren(h("p", { class: "caption" },
      `Accuracy on the validation split (${c.validation_examples ? `at most ${c.validation_examples}` : "the"} training images held out from training) after each epoch; epoch 0 is the input model. `,
      `Robust accuracies under ${threatText(state.job.threat_model)}: W2 by W-PGD (${c.eval_wpgd_steps ?? "?"} steps), `,
      `the pointwise ball of the same radius by PGD (${c.eval_pgd_steps ?? "?"} steps).`));
  };

  const drawBeforeAfter = () => swap(parts.beforeAfter, [state.job.status, state.job.result], () => {
    const ba = beforeAfter(state.job);
    if (!ba) {
      return card("Before and after", h("p", { class: "muted" },
        ACTIVE.has(state.job.status) ? "The before/after comparison appears when the job finishes." : "This job has no result."));
    }
    const epoch = ba.epoch === null ? "" : ` (epoch ${ba.epoch})`;
    const verdict = verdictOf(state.job.result);
    const preset = presetOf(state.job.result, state.job.config);
    return card("Before and after",
      verdict ? h("div", { class: `note ${verdict.tone === "ok" ? "info" : "warn"}`, role: "status", id: "verdict", "data-verdict": verdict.code },
        h("strong", {}, verdict.words)) : null,
      table(["Test accuracy", numHead("Input model"), numHead(`Selected checkpoint${epoch}`), numHead("Change")],
        ba.rows.map((r) => h("tr", { "data-metric": r.key },
          h("th", {}, r.key === "clean_accuracy" ? "Clean" : `${r.label} at δ = ${fmtDelta(ba.threat.delta)}`),
          h("td", { class: "num" }, pct(r.before), interval(r.beforeCi)), h("td", { class: "num" }, pct(r.after), interval(r.afterCi)),
          h("td", { class: `num ${r.change > 0 ? "up" : r.change < 0 ? "down" : ""}` }, points(r.change), interval(r.changeCi, true)))),
        { id: "before-after" }),
      h("p", { class: "caption", id: "before-after-threat" },
        `Threat model: ${threatText(ba.threat)}${ba.examples ? `; ${ba.examples} test images` : ""}. `
        + "The checkpoint is selected on the validation split; these numbers are on the test split"
        + `${preset ? `, attacked with the “${preset}” evaluation preset` : ""}. `
        + "Below each number: its 95 % interval (the change's is paired, over the same test images)."),
      h("div", { class: "actions" },
        h("button", { type: "button", class: "primary", id: "download-selected", onclick: () => api.download(`v1/jobs/${id}/checkpoint`) }, "Download the selected checkpoint"),
        state.job.status === "succeeded" ? h("button", { type: "button", onclick: () => api.download(`v1/jobs/${id}/report`, `${id}-report.json`) }, "Report (JSON)") : null));
  });

  const drawCheckpoints = () => {
    const metrics = epochMetrics(state.job.threat_model);
    const sel = selectedEpoch(state.job, state.checkpoints, state.events);
    swap(parts.checkpoints, [sel, state.checkpoints.map((c) => c.id)], () => card("Checkpoints", checkpointTable(metrics, sel)));
  };
  const checkpointTable = (metrics, sel) => {
    const rows = state.checkpoints.map((c) => h("tr", { "data-checkpoint": c.id, class: sel?.epoch === c.epoch ? "selected" : null },
      h("td", {}, `${c.epoch}`, sel?.epoch === c.epoch ? h("span", { class: "tag" }, sel.final ? "selected" : "best so far") : null),
      metrics.map((m) => h("td", { class: "num" }, pct(c.metrics?.[m.key]))),
      h("td", { class: "num hide-sm" }, bytes(c.size)),
      h("td", {}, h("button", { type: "button", class: "small", onclick: () => api.download(c.urls?.content || `v1/jobs/${id}/checkpoints/${c.id}/content`, c.filename) }, "Download"))));
    return rows.length ? table(["Epoch", ...metrics.map((m) => numHead(m.label)), numHead("Size", "hide-sm"), ""], rows, { id: "checkpoints" })
      : h("p", { class: "muted" }, "A checkpoint is stored after each epoch.");
  };

  const drawEvaluation = () => swap(parts.evaluation, [state.job.status, !!state.report], () => {
    const curves = robustnessCurves(state.report);
    if (!curves) {
      return card("Robust accuracy against δ", h("p", { class: "muted" },
        ACTIVE.has(state.job.status) ? "The curves appear when the evaluation finishes." : "This evaluation has no report."));
    }
    const deltas = [...new Set(curves.curves.flatMap((c) => c.points.map((p) => p[0])))].sort((a, b) => a - b);
    const preset = presetOf(state.report, state.job.result, state.job.config);
    const attacks = attackRows(state.report);
    return card("Robust accuracy against δ",
      lineChart({
        id: "robustness", xLabel: "radius δ", yLabel: "accuracy", xName: "δ", xMin: 0, xFormat: fmtDelta,
        series: curves.curves.map((c, i) => ({ ...c, points: fromClean(c.points, curves.clean), color: PALETTE[i + 1] })),
        refs: curves.clean === null ? [] : [{ name: "clean", y: curves.clean, color: PALETTE[0] }],
      }),
      table(["δ", ...curves.curves.map((c) => numHead(c.name))], deltas.map((d) => h("tr", {},
        h("th", {}, fmtDelta(d)),
        curves.curves.map((c) => {
          const p = c.points.find((q) => q[0] === d);
          return h("td", { class: "num" }, pct(p?.[1]), interval(p?.[2]));
        }))), { id: "robustness-table" }),
      h("p", { class: "caption" }, `Clean accuracy ${pct(curves.clean)}${curves.examples ? ` on ${curves.examples} test images` : ""}; `,
        `threat model of the job: ${threatText(state.job.threat_model)}`,
        preset ? h("span", { id: "evaluation-preset", "data-preset": preset }, `; evaluation preset “${preset}”`) : null,
        ". Below each number: its 95 % interval. The W2 number at a radius is the smallest over the attacks below."),
      attacks.length ? h("details", {}, h("summary", {}, `The attacks (${attacks.length})`),
        table(["δ", "Attack", numHead("Steps"), "Converged", numHead("Robust accuracy")], attacks.map((a) => h("tr", { "data-attack": a.attack },
          h("td", {}, fmtDelta(a.delta)), h("td", {}, a.attack), h("td", { class: "num" }, a.steps ?? "—"),
          h("td", {}, a.converged === null ? "—" : a.converged ? "yes" : "no (an upper bound)"),
          h("td", { class: "num" }, pct(a.accuracy?.value), interval(a.accuracy?.ci95)))), { id: "attacks" })) : null);
  });

  // the masking audit and the per-class numbers: a fine-tune's result, an evaluation's report
  const drawFindings = () => {
    const sources = [state.report, state.job.result, state.job.result?.after];   // a fine-tune's per-class rows: `after`
    swap(parts.audit, [state.job.status, !!state.report, state.job.result?.audit], () => auditCard(auditOf(...sources)));
    swap(parts.perClass, [state.job.status, !!state.report, state.job.result?.per_class], () => perClassCard(perClassOf(...sources)));
    swap(parts.corruptions, [state.job.status, !!state.report, !!state.job.result?.after?.corruptions], () => corruptionCard(corruptionsOf(state.job, state.report)));
  };

  const drawAll = () => {
    drawHead();
    if (finetune) { drawCurves(); drawBeforeAfter(); drawCheckpoints(); } else drawEvaluation();
    drawFindings();
  };

  // ------------------------------------------------------------------ data
  const loadJob = async () => { state.job = await api.get(`v1/jobs/${id}`, null, signal); };
  const loadCheckpoints = async () => { if (finetune) state.checkpoints = (await api.get(`v1/jobs/${id}/checkpoints`, null, signal)).data || []; };
  const loadReport = async () => {
    if (finetune || state.job.status !== "succeeded" || state.report) return;
    state.report = await api.get(`v1/jobs/${id}/report`, null, signal);
  };
  await Promise.all([loadCheckpoints(), loadReport()]);
  drawAll();

  // Redraws are batched to one per frame however fast the events come.
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; drawAll(); });
  };
  const onEvent = (event) => {
    if (event.type === "metrics" || event.type === "checkpoint") state.events.push(event);   // what the curves need
    appendLog(log, logBox, event);
    if (event.type === "checkpoint" || event.type === "status") {
      Promise.all([loadJob(), loadCheckpoints()]).then(loadReport).then(redraw).catch(() => {});
    } else {
      redraw();
    }
  };
  api.followEvents(id, onEvent, signal)
    .then(() => Promise.all([loadJob(), loadCheckpoints()]).then(loadReport).then(redraw))
    .catch((err) => { if (err.name !== "AbortError") alerts.replaceChildren(errorNote(err)); });
  // Progress (fraction, ETA) changes between events: poll the job while it is active.
  every(1500, async () => {
    if (!ACTIVE.has(state.job.status)) return;
    await loadJob();
    redraw();
  }, signal, (err) => alerts.replaceChildren(errorNote(err)));
}

const fact = (term, value) => [h("dt", {}, term), h("dd", {}, value)];

/** A 95 % interval under its number (`signed`: a change, in points). */
// The run time estimated at submit, on an idle worker of each device class (docs/runtimes.md).
function estimateText(estimate) {
  const rows = Object.entries(estimate.devices || {});
  if (!rows.length) return `none (${estimate.reason || "no worker has calibrated yet"})`;
  return rows.map(([name, d]) => `${name}: about ${duration(d.seconds)} (${d.basis})`).join("; ");
}

function interval(ci, signed = false) {
  if (!ci) return null;
  const text = signed ? `${points(ci[0])} to ${points(ci[1])}` : intervalText(ci);
  return h("span", { class: "ci", title: "95 % interval" }, text);
}

const AUDIT_WORDS = { pass: "pass", warn: "warning", fail: "fail" };

/** The masking audit: one line per check, its status first. */
function auditCard(checks) {
  if (!checks.length) return null;
  const failed = checks.filter((c) => c.status === "fail").length;
  const warned = checks.filter((c) => c.status === "warn").length;
  const summary = failed
    ? note("error", h("strong", {}, `${failed} check${failed > 1 ? "s" : ""} failed: `), "the robust accuracy may be overstated (gradient masking); do not trust it before the cause is found.")
    : warned ? note("warn", `${warned} warning${warned > 1 ? "s" : ""}: read the lines below before relying on the number.`) : null;
  return card("Masking audit", summary,
    h("ul", { class: "audit", id: "audit" }, checks.map((c) => h("li", { "data-check": c.check, "data-status": c.status },
      h("span", { class: `audit-status a-${c.status}` }, AUDIT_WORDS[c.status]), h("strong", {}, c.check), " ", c.detail))),
    h("p", { class: "caption" }, "Checks that the attack found what there is to find: robust accuracy falls with the radius and with more steps, "
      + "random noise of the same size hurts far less, the attacks agree, and (fine-tunes) an attack transferred from the input model is weaker."));
}

/** Per-class accuracy on the test split. */
function perClassCard(rows) {
  if (!rows.length) return null;
  const hasRobust = rows.some((r) => r.robust);
  return card("Per class", h("details", {}, h("summary", {}, `Accuracy of each of the ${rows.length} classes on the test split`),
    table(["Class", numHead("Images"), numHead("Clean"), hasRobust ? numHead("W2 robust") : null].filter(Boolean),
      rows.map((r) => h("tr", { "data-class": r.label },
        h("td", {}, r.name ? `${r.label} ${r.name}` : `${r.label}`), h("td", { class: "num" }, r.n ?? "—"),
        h("td", { class: "num" }, pct(r.clean?.value), interval(r.clean?.ci95)),
        hasRobust ? h("td", { class: "num" }, pct(r.robust?.value), interval(r.robust?.ci95)) : null)), { id: "per-class" })));
}


function epochSpec({ job, events, checkpoints }) {
  const history = epochHistory(job, events, checkpoints);
  const sel = selectedEpoch(job, checkpoints, events);
  const delta = job.threat_model?.delta;
  return {
    id: "epochs", xLabel: "epoch (0 = input model)", yLabel: "validation accuracy", xName: "epoch", xInteger: true,
    xMin: 0, xMax: job.config?.epochs ?? job.progress?.total_epochs ?? undefined,
    empty: "waiting for the first epoch…",
    series: epochMetrics(job.threat_model).map((m, i) => ({
      name: m.key === "clean_accuracy" ? m.label : `${m.label} (δ = ${fmtDelta(delta)})`,
      color: PALETTE[i], dash: i === 0 ? "dashed" : null,
      points: history.filter((r) => typeof r[m.key] === "number").map((r) => [r.epoch, r[m.key]]),
    })),
    marker: sel ? { x: sel.epoch, label: `${sel.final ? "selected" : "best so far"}: epoch ${sel.epoch}`, legend: "selected checkpoint" } : null,
  };
}

async function cancelJob(state, redraw) {
  if (!confirm(`Cancel job ${state.job.id}? Checkpoints written so far are kept.`)) return;
  try {
    state.job = await api.post(`v1/jobs/${state.job.id}/cancel`);
    redraw();
  } catch (err) {
    alert(err.message);
  }
}

function describe(event) {
  const d = event.data || {};
  if (event.type === "metrics") {
    return `epoch ${d.epoch}: clean ${pct(d.clean_accuracy)}, W2 ${pct(d.w2_robust_accuracy)}, `
      + `${"l2_robust_accuracy" in d ? "l2" : "l∞"} ${pct(d.l2_robust_accuracy ?? d.linf_robust_accuracy)}`;
  }
  return event.message || event.type;
}

function appendLog(log, box, event) {
  const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 8;
  log.append(h("li", { class: `lvl-${event.level || "info"}`, "data-type": event.type },
    h("time", { datetime: event.created_at }, clock(event.created_at)),
    h("span", { class: "etype" }, event.type),
    h("span", {}, describe(event))));
  while (log.childElementCount > MAX_LOG) log.firstElementChild.remove();
  if (atEnd) box.scrollTop = box.scrollHeight;
}
