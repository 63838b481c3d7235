// Reading what the API returns about results: per-epoch metrics, before/after, robustness curves.
// Every field is read defensively (missing or renamed fields give gaps, never errors), so the
// page keeps working while the result format grows.

const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

/** The three held-out accuracies a fine-tune tracks, in the order they are drawn: clean, W2 and
 *  pointwise robust accuracy (the pointwise ball has the ground norm of the threat model). */
export function epochMetrics(threat) {
  const l2 = typeof threat?.kind === "string" && threat.kind.endsWith("l2");
  return [
    { key: "clean_accuracy", label: "Clean" },
    { key: "w2_robust_accuracy", label: "W2 robust", attack: "W-PGD" },
    l2 ? { key: "l2_robust_accuracy", label: "l2 robust", attack: "PGD" } : { key: "linf_robust_accuracy", label: "l∞ robust", attack: "PGD" },
  ];
}

const THREATS = {
  "w2-linf": "W2 ball, l∞ ground cost",
  "w2-l2": "W2 ball, l2 ground cost",
  linf: "l∞ ball",
  l2: "l2 ball",
};

/** "W2 ball, l∞ ground cost, δ = 0.1" for a threat model object {kind, delta}. */
export function threatText(tm) {
  if (!tm || typeof tm !== "object") return "—";
  const kind = THREATS[tm.kind] || tm.kind || "threat model";
  return num(tm.delta) === null ? kind : `${kind}, δ = ${fmtDelta(tm.delta)}`;
}

/** A radius as typed by people: 0.0314 → "0.0314 (8/255)". */
export function fmtDelta(d) {
  if (num(d) === null) return "—";
  const k = d * 255;
  const plain = +d.toPrecision(3);
  const whole = (x) => Math.abs(x - Math.round(x)) < 1e-6;
  // k/255 radii (the l∞ convention) are named as such, unless they are round decimals anyway
  return whole(k) && k >= 1 && k < 64 && !whole(d * 100) ? `${plain} (${Math.round(k)}/255)` : `${plain}`;
}

/**
 * Per-epoch held-out metrics of a fine-tune, epoch 0 being the input model: merged from the
 * job's "metrics" events, its checkpoints and its result (whichever the server has so far).
 * Returns [{epoch, clean_accuracy, ...}] sorted by epoch.
 */
export function epochHistory(job, events = [], checkpoints = []) {
  const byEpoch = new Map();
  const put = (epoch, metrics) => {
    if (num(epoch) === null || !metrics || typeof metrics !== "object") return;
    byEpoch.set(epoch, { ...(byEpoch.get(epoch) || {}), ...metrics, epoch });
  };
  const result = job?.result || {};
  for (const h of Array.isArray(result.history) ? result.history : []) put(h?.epoch, h);
  for (const c of checkpoints) put(c?.epoch ?? c?.metrics?.epoch, c?.metrics);
  for (const e of events) if (e?.type === "metrics") put(e.data?.epoch, e.data);
  // epoch 0 is the input model on the validation split (result.before is the test split's)
  if (result.validation?.before) put(0, result.validation.before);
  return [...byEpoch.values()].sort((a, b) => a.epoch - b.epoch);
}

/**
 * The checkpoint the job hands back: its epoch, and whether the job has chosen it for good
 * (`final`) or it is the best so far of a running job.
 */
export function selectedEpoch(job, checkpoints = [], events = []) {
  const r = job?.result || {};
  const fromResult = num(r.best_epoch) ?? num(r.selected_epoch) ?? num(r.after?.epoch);
  if (fromResult !== null) return { epoch: fromResult, final: true };
  const best = [...checkpoints].filter((c) => c?.is_best).sort((a, b) => b.epoch - a.epoch)[0];
  if (best) return { epoch: best.epoch, final: false };
  const ev = events.filter((e) => e?.type === "checkpoint" && e.data?.is_best).pop();
  return ev ? { epoch: ev.data.epoch, final: false } : null;
}

/**
 * The before/after rows of a finished fine-tune: [{label, before, after, change}], plus what they
 * measure (the threat model and δ of the robust accuracies), `improved` when the server says.
 */
export function beforeAfter(job) {
  const r = job?.result;
  if (!r || !r.before || !(r.after || r.best)) return null;
  const after = r.after || r.best;
  // the result's threat_model is {kind, delta}; a metrics row names only the kind
  const asThreat = (t) => (typeof t === "string" ? { kind: t } : t && typeof t === "object" ? t : null);
  const threat = asThreat(r.threat_model) || asThreat(after.threat_model) || asThreat(job.threat_model);
  const rows = epochMetrics(threat).map(({ key, label }) => {
    const b = num(r.before[key]);
    const a = num(after[key]);
    return { key, label, before: b, after: a, change: a !== null && b !== null ? a - b : null };
  });
  const delta = num(after.delta) ?? num(r.delta) ?? num(threat?.delta);
  return {
    rows, threat: { ...(threat || {}), delta }, epoch: num(after.epoch) ?? num(r.best_epoch),
    improved: typeof r.improved === "boolean" ? r.improved : null,
    examples: num(after.n_examples) ?? num(r.provenance?.examples?.test) ?? num(job.config?.test_examples),
  };
}

const ATTACK_NAMES = { pgd: "PGD", autoattack: "AutoAttack", apgd: "APGD" };

/**
 * Robust accuracy against δ from an evaluation report: one curve per attack
 * [{name, attack, threat, points: [[delta, accuracy]]}] and the clean accuracy.
 */
export function robustnessCurves(report) {
  if (!report || typeof report !== "object") return null;
  const curves = [];
  const w2 = (Array.isArray(report.w2) ? report.w2 : [])
    .map((row) => [num(row?.delta), num(row?.robust_accuracy)]).filter(([d, a]) => d !== null && a !== null);
  if (w2.length) curves.push({ name: "W2 (W-PGD)", attack: "w-pgd", threat: "w2", points: w2 });
  const groups = new Map();
  for (const row of Array.isArray(report.pointwise) ? report.pointwise : []) {
    const d = num(row?.delta);
    const a = num(row?.robust_accuracy);
    if (d === null || a === null) continue;
    const threat = row.threat === "l2" ? "l2" : "l∞";
    const attack = String(row.attack || "attack");
    const name = `${threat} ${ATTACK_NAMES[attack] || (attack.startsWith("autoattack") ? "AutoAttack" : attack)}`;
    if (!groups.has(name)) groups.set(name, { name, attack: row.attack, threat, points: [] });
    groups.get(name).points.push([d, a]);
  }
  for (const g of groups.values()) curves.push(g);
  for (const c of curves) c.points.sort((p, q) => p[0] - q[0]);
  const clean = num(report.clean_accuracy) ?? num(report.summary?.clean_accuracy)
    ?? num(report.w2?.[0]?.clean_accuracy);
  return { curves, clean, examples: num(report.n_examples) };
}

/** A fine-tune without an evaluation still has one δ: its before and after as single points. */
export function finetunePoints(job) {
  const ba = beforeAfter(job);
  if (!ba || ba.threat.delta === null) return null;
  const [clean, w2, pointwise] = ba.rows;
  const ball = pointwise.label.replace(" robust", "");
  const at = (side) => ({
    clean: clean[side], examples: ba.examples,
    curves: [
      { name: "W2 (W-PGD)", attack: "w-pgd", threat: "w2", points: [[ba.threat.delta, w2[side]]] },
      { name: `${ball} PGD`, attack: "pgd", threat: ball, points: [[ba.threat.delta, pointwise[side]]] },
    ].filter((c) => c.points[0][1] !== null),
  });
  return { before: at("before"), after: at("after") };
}

/** Progress of a job as numbers and words: {fraction, text, eta}. */
export function progressOf(job) {
  const p = job?.progress || {};
  const fraction = num(p.fraction) ?? (job?.status === "succeeded" ? 1 : 0);
  const parts = [];
  if (num(p.epoch) !== null && num(p.total_epochs) !== null && p.total_epochs > 0) parts.push(`epoch ${p.epoch}/${p.total_epochs}`);
  if (p.phase && p.phase !== "done") parts.push(p.phase);
  return { fraction: Math.min(Math.max(fraction, 0), 1), text: parts.join(" · "), eta: num(p.eta_seconds) };
}
