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
    const b = accuracyOf(r.before, key);
    const a = accuracyOf(after, key);
    const paired = changeOf(r, key);   // the paired interval of the change, when the result has one
    return {
      key, label, before: b?.value ?? null, after: a?.value ?? null, beforeCi: b?.ci95 ?? null, afterCi: a?.ci95 ?? null,
      change: paired?.change ?? (a && b ? a.value - b.value : null), changeCi: paired?.ci95 ?? null,
    };
  });
  const delta = num(after.delta) ?? num(r.delta) ?? num(threat?.delta);
  return {
    rows, threat: { ...(threat || {}), delta }, epoch: num(after.epoch) ?? num(r.best_epoch),
    improved: typeof r.improved === "boolean" ? r.improved : null,
    examples: num(after.n_examples) ?? accuracyOf(after, "clean_accuracy")?.n ?? num(r.provenance?.examples?.test)
      ?? num(job.config?.test_examples),
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
  // a point is [δ, accuracy, its 95 % interval or null]
  const w2 = (Array.isArray(report.w2) ? report.w2 : [])
    .map((row) => [num(row?.delta), num(row?.robust_accuracy), accuracyOf(row, "robust_accuracy")?.ci95 ?? null])
    .filter(([d, a]) => d !== null && a !== null);
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
    groups.get(name).points.push([d, a, accuracyOf(row, "robust_accuracy")?.ci95 ?? null]);
  }
  for (const g of groups.values()) curves.push(g);
  for (const c of curves) c.points.sort((p, q) => p[0] - q[0]);
  const clean = num(report.clean_accuracy) ?? num(report.summary?.clean_accuracy)
    ?? num(report.w2?.[0]?.clean_accuracy);
  return { curves, clean, examples: num(report.n_examples) };
}

/**
 * A robustness curve drawn from δ = 0, where the robust accuracy is the clean accuracy: a single
 * radius then reads as a line from the clean accuracy down to its robust point, not a lone dot at
 * the chart's right edge. The table keeps the measured radii only.
 */
export function fromClean(points, clean) {
  if (num(clean) === null || points.some((p) => p[0] === 0)) return points;
  return [[0, clean, null], ...points];
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

// ------------------------------------------------------------------ uncertainty, audit, verdict
// The report's newer fields (intervals, the evaluation preset, the masking audit, per-class
// numbers, a fine-tune's verdict); an older report simply has none of them.

/**
 * An accuracy with its n and 95 % interval, {value, n, ci95: [lo, hi] | null}, from either shape the
 * engine writes: a block {accuracy, n, ci95}, or a number beside "<key>_ci95" (and "n_examples").
 */
export function accuracyOf(block, key) {
  const v = block?.[key];
  if (v && typeof v === "object") {
    return num(v.accuracy) === null ? null : { value: v.accuracy, n: num(v.n), ci95: pair(v.ci95) };
  }
  if (num(v) === null) return null;
  const ci = block[`${key}_ci95`] ?? (key === "robust_accuracy" ? block.ci95 : null);
  return { value: v, n: num(block[`${key}_n`]) ?? num(block.n) ?? num(block.n_examples), ci95: pair(ci) };
}

const pair = (v) => (Array.isArray(v) && v.length === 2 && num(v[0]) !== null && num(v[1]) !== null ? v : null);

/** "58.1–68.0 %" for an interval; "" without one. */
export const intervalText = (ci) => (ci ? `${(100 * ci[0]).toFixed(1)}–${(100 * ci[1]).toFixed(1)} %` : "");

/** The evaluation preset the numbers were measured with ("standard", "quick"), or null. */
export function presetOf(...sources) {
  for (const s of sources) {
    const p = s?.provenance?.evaluation ?? s?.evaluation ?? s?.summary?.evaluation ?? s?.config?.evaluation;
    if (typeof p === "string") return p;
    if (typeof p?.preset === "string") return p.preset;
  }
  return null;
}

/** The masking audit's checks [{check, status, detail}] of the first source that has one. */
export function auditOf(...sources) {
  for (const s of sources) {
    const a = s?.audit ?? s?.summary?.audit;
    if (Array.isArray(a) && a.length) {
      return a.filter((c) => c && typeof c === "object")
        .map((c) => ({ check: String(c.check ?? "check"), status: ["pass", "warn", "fail"].includes(c.status) ? c.status : "warn", detail: String(c.detail ?? "") }));
    }
  }
  return [];
}

// A fine-tune's verdict in plain words, and how the page shows it.
const VERDICTS = {
  improved: ["ok", "Improved: the 95 % interval of the change lies above zero."],
  no_significant_change: ["warn", "No significant change: the 95 % interval of the change includes zero."],
  worse: ["warn", "Worse: the 95 % interval of the change lies below zero."],
  improved_with_clean_drop: ["warn", "More robust, but the clean accuracy fell by more than the allowed drop."],
  improved_with_class_collapse: ["warn", "More robust, but the accuracy on a class collapsed."],
  improved_but_audit_failed: ["warn", "More robust by the numbers, but the masking audit failed: the gain may be masking."],
  unchanged: ["warn", "Unchanged: no fine-tuned epoch beat the input model, which is handed back."],
  stopped: ["warn", "Stopped before the test numbers were measured."],
};

/** {code, tone: "ok" | "warn", words} of a finished fine-tune's verdict, or null. */
export function verdictOf(result) {
  if (!result || typeof result !== "object") return null;
  const code = typeof result.verdict === "string" ? result.verdict : typeof result.verdict?.code === "string" ? result.verdict.code : null;
  const own = typeof result.verdict_text === "string" ? result.verdict_text : typeof result.verdict?.text === "string" ? result.verdict.text : null;
  if (code) {
    const [tone, words] = VERDICTS[code] || ["warn", `${code.replaceAll("_", " ")}.`];
    return { code, tone, words: own || words };
  }
  return null;
}

/**
 * Whether a fine-tune that succeeded improved the model, for the jobs list: {improved, code, words},
 * or null (an evaluation, a fine-tune that has not succeeded or has no result). The verdict
 * decides (only an unqualified "improved" is an improvement); an older result without one says
 * it through `improved`.
 */
export function improvementOf(job) {
  if (job?.type !== "finetune" || job.status !== "succeeded" || !job.result || typeof job.result !== "object") return null;
  const verdict = verdictOf(job.result);
  if (verdict) return { improved: verdict.code === "improved", code: verdict.code, words: verdict.words };
  if (typeof job.result.improved === "boolean") {
    return { improved: job.result.improved, code: null, words: job.result.improved ? "Improved." : "No improvement." };
  }
  return null;
}

/** The paired change of `key` with its interval {change, ci95}, when the result has one. */
export function changeOf(result, key) {
  const c = result?.change?.[key];
  if (num(c) !== null) return { change: c, ci95: pair(result.change_ci95?.[key]) };   // the interval beside it
  if (c && typeof c === "object" && num(c.change) !== null) return { change: c.change, ci95: pair(c.ci95) };
  const basis = result?.verdict_basis;
  if (basis?.metric === key && num(basis.change) !== null) return { change: basis.change, ci95: pair(basis.ci95) };
  return null;
}

/** Per-class rows [{label, name, n, clean, robust}] (accuracies as accuracyOf gives them). */
export function perClassOf(...sources) {
  for (const s of sources) {
    let rows = s?.per_class;
    if (rows && !Array.isArray(rows) && typeof rows === "object") rows = rows.after ?? rows.test;
    if (!Array.isArray(rows) || !rows.length) continue;
    return rows.filter((r) => r && typeof r === "object").map((r) => ({
      label: num(r.class) ?? num(r.label), name: typeof r.name === "string" ? r.name : null, n: num(r.n),
      clean: accuracyOf(r, "clean_accuracy"),
      robust: accuracyOf(r, "w2_robust_accuracy") ?? accuracyOf(r, "robust_accuracy"),
    }));
  }
  return [];
}

/** An evaluation's attack rows [{delta, attack, steps, converged, accuracy}] from its W2 rows. */
export function attackRows(report) {
  const out = [];
  for (const row of Array.isArray(report?.w2) ? report.w2 : []) {
    for (const a of Array.isArray(row?.attacks) ? row.attacks : []) {
      if (!a || typeof a !== "object") continue;
      out.push({ delta: num(row.delta), attack: String(a.attack ?? "attack"), steps: num(a.steps),
        converged: typeof a.converged === "boolean" ? a.converged : null, accuracy: accuracyOf(a, "robust_accuracy") });
    }
  }
  return out;
}

/** A data set's census: per-class counts per split and its warnings [{code, split, message}]. */
export function censusOf(dataset) {
  const counts = dataset?.class_counts && typeof dataset.class_counts === "object" ? dataset.class_counts : null;
  const splits = counts ? Object.entries(counts).filter(([, v]) => Array.isArray(v)) : [];
  const warnings = (Array.isArray(dataset?.warnings) ? dataset.warnings : []).filter((w) => w && typeof w === "object");
  return { splits, warnings };
}

// ------------------------------------------------------------------ common corruptions
// A block {types, severities, rows, per_type, mean_accuracy, skipped, versus_input, ...} in an
// evaluation's report and in a fine-tune's before/after (docs/http-api.md).

/**
 * The common corruptions of a job: per type [{type, before, after}] (each the mean accuracy over
 * the type's measured severities, {value, ci95}, or null when none could be measured), the
 * skipped cells [{type, severity, reason}], the means, and the input-relative mCE (fine-tunes).
 * `before` is null for an evaluation (one model). Null when the job measured none.
 */
export function corruptionsOf(job, report) {
  const r = job?.result || {};
  const isBlock = (b) => b && typeof b === "object" && Array.isArray(b.per_type);
  const after = [r.after?.corruptions, report?.corruptions, r.corruptions, report?.after?.corruptions].find(isBlock);
  if (!after) return null;
  // a fine-tune that handed its input back (best epoch 0) measured one model
  const before = r.best_epoch === 0 ? null : [r.before?.corruptions, report?.before?.corruptions].find(isBlock) || null;
  const typeOf = (block, type) => {
    const row = block?.per_type.find((t) => t?.type === type);
    return row && num(row.accuracy) !== null ? { value: row.accuracy, ci95: pair(row.ci95) } : null;
  };
  const types = [...new Set([...(Array.isArray(after.types) ? after.types : []), ...after.per_type.map((t) => t?.type)])]
    .filter((t) => typeof t === "string");
  const mean = (block) => (num(block?.mean_accuracy) === null ? null : { value: block.mean_accuracy, ci95: pair(block.mean_accuracy_ci95) });
  const vs = after.versus_input && typeof after.versus_input === "object" ? after.versus_input : null;
  return {
    rows: types.map((type) => ({ type, before: before ? typeOf(before, type) : null, after: typeOf(after, type) })),
    skipped: (Array.isArray(after.skipped) ? after.skipped : []).filter((c) => c && typeof c === "object"),
    before: before ? { mean: mean(before), clean: num(before.clean_accuracy) } : null,
    after: { mean: mean(after), clean: num(after.clean_accuracy) },
    compared: !!vs,
    mce: vs && num(vs.mce) !== null ? { value: vs.mce, ci95: pair(vs.mce_ci95) } : null,
    relativeMce: vs && num(vs.relative_mce) !== null ? { value: vs.relative_mce, ci95: pair(vs.relative_mce_ci95) } : null,
    change: vs && num(vs.mean_accuracy_change) !== null ? { value: vs.mean_accuracy_change, ci95: pair(vs.mean_accuracy_change_ci95) } : null,
    examples: num(after.n_examples), measured: num(after.cells_measured), asked: num(after.cells_asked),
  };
}
