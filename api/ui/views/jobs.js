// The jobs list: status, type, model, data set (by name), a fine-tune's outcome (improved or not),
// progress and ETA, live; filters and paging.

import * as api from "../api.js";
import { ago, badge, duration, errorNote, every, fill, h, progressBar, short, table } from "../dom.js";
import { improvementOf, progressOf } from "../results.js";

const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];
const ACTIVE = new Set(["queued", "running", "cancelling"]);
const PAGE = 20;   // jobs a page (the URL's limit= overrides it)

const hashFor = (params) => `#/jobs${params.toString() ? `?${params}` : ""}`;

export async function jobsView(root, { params, signal }) {
  // Paging goes forward with the API's cursor (the last id of a page); the cursors of the pages
  // before this one are kept in the URL so that "Newer" can go back.
  const cursors = (params.get("pages") || "").split(",").filter(Boolean);
  const filters = { status: params.get("status") || "", type: params.get("type") || "" };
  const limit = Math.min(Math.max(Number(params.get("limit")) || PAGE, 1), 100);

  const setFilter = (name) => (event) => {
    const next = new URLSearchParams(params);
    if (event.target.value) next.set(name, event.target.value); else next.delete(name);
    next.delete("pages");
    location.hash = hashFor(next);
  };
  const select = (name, label, options) => h("label", {}, label,
    h("select", { name, onchange: setFilter(name) },
      h("option", { value: "" }, "all"),
      options.map((o) => h("option", { value: o, selected: filters[name] === o }, o))));

  const rows = h("tbody");
  const status = h("div", { class: "status-line" });
  const pager = h("div", { class: "pager" });
  fill(root, 
    h("div", { class: "page-head" }, h("h1", {}, "Jobs"), h("a", { class: "button primary", href: "#/new" }, "New job")),
    h("div", { class: "filters" }, select("status", "Status", STATUSES), select("type", "Type", ["finetune", "evaluate", "sweep"])),
    status,
    table(["Job", "Type", "Status", "Model", h("th", { class: "hide-sm" }, "Data set"), "Outcome", "Progress",
      h("th", { class: "hide-sm" }, "ETA"), h("th", { class: "hide-sm" }, "Created")], rows, { id: "jobs-table", class: "jobs" }),
    pager,
  );

  const refresh = async () => {
    const page = await api.get("v1/jobs", { ...filters, limit, after: cursors.at(-1) }, signal);
    const jobs = page.data || [];
    const [names, datasets] = await Promise.all([
      api.modelIndex(jobs.map((j) => j.model_id)), api.datasetIndex(jobs.map((j) => j.dataset))]);
    status.replaceChildren();
    rows.replaceChildren(...jobs.map((job) => row(job, names.get(job.model_id), datasets.get(job.dataset))));
    if (!jobs.length) {
      rows.append(h("tr", {}, h("td", { colspan: 9, class: "empty" },
        filters.status || filters.type ? "No job matches these filters." : "No jobs yet. ",
        filters.status || filters.type ? null : h("a", { href: "#/models" }, "Register a model"),
        filters.status || filters.type ? null : ", then start a fine-tune or an evaluation.")));
    }
    const newer = new URLSearchParams(params);
    const older = new URLSearchParams(params);
    if (cursors.length > 1) newer.set("pages", cursors.slice(0, -1).join(",")); else newer.delete("pages");
    older.set("pages", [...cursors, page.last_id].join(","));
    fill(pager, 
      cursors.length ? h("a", { class: "button", href: hashFor(newer) }, "← Newer") : null,
      h("span", { class: "muted" }, `page ${cursors.length + 1}`),
      page.has_more ? h("a", { class: "button", href: hashFor(older) }, "Older →") : null);
  };
  await every(2000, refresh, signal, (err) => status.replaceChildren(errorNote(err)));
}

/** A job's data set by name: a built-in one is its own name, an upload its name (its id when deleted). */
function datasetCell(id, dataset) {
  const uploaded = typeof id === "string" && id.startsWith("ds_");
  const label = !uploaded ? id : dataset?.name ? dataset.name : h("span", { class: "mono" }, short(id));
  return h("td", { class: "wrap hide-sm", "data-dataset": id, title: uploaded ? id : null }, label);
}

/** A finished fine-tune's outcome in two words, its verdict on hovering; "—" for anything else. */
function outcomeCell(job) {
  const outcome = improvementOf(job);
  if (!outcome) return h("td", { class: "muted", "data-improved": "" }, "—");
  return h("td", { "data-improved": String(outcome.improved), "data-verdict": outcome.code ?? "", title: outcome.words },
    h("span", { class: `outcome ${outcome.improved ? "o-improved" : "o-not"}` }, outcome.improved ? "improved" : "not improved"));
}

function row(job, model, dataset) {
  const p = progressOf(job);
  const active = ACTIVE.has(job.status);
  return h("tr", { "data-job": job.id },
    h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, short(job.id))),
    h("td", {}, job.type === "finetune" ? "fine-tune" : job.type),
    h("td", {}, badge(job.status)),
    h("td", { class: "wrap" }, model ? model.name || short(model.id) : h("span", { class: "mono" }, short(job.model_id))),
    datasetCell(job.dataset, dataset),
    outcomeCell(job),
    // the label is clipped to the column; the whole of it shows on hovering
    h("td", { class: "progress-cell", title: active && p.text ? p.text : null },
      progressBar(p.fraction, active && p.text ? `${Math.round(100 * p.fraction)} % · ${p.text}` : undefined)),
    h("td", { class: "hide-sm" }, active && p.eta !== null ? duration(p.eta) : "—"),
    h("td", { class: "hide-sm", title: job.created_at }, ago(job.created_at)));
}
