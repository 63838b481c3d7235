// Models: the list, registering one (an uploaded safetensors file, or a RobustBench ID), deleting.

import * as api from "../api.js";
import { ago, badge, bytes, card, errorNote, every, fill, h, note, numHead, pct, progressBar, short, swap, table } from "../dom.js";
import { deref, readFields, schemaFields, showFieldErrors } from "../form.js";
import { builtinDatasets } from "./newjob.js";

/** The request-body schema of POST `path` for one media type, from the OpenAPI document. */
export function bodySchema(openapi, path, media) {
  return deref(openapi.paths?.[path]?.post?.requestBody?.content?.[media]?.schema, openapi);
}

/** Names to suggest for the architecture field: GET /v1/architectures when the server has it,
 *  else the examples the upload schema gives. */
async function architectures(openapi, uploadSchema) {
  if (openapi.paths?.["/v1/architectures"]) {
    const list = await api.get("v1/architectures");
    const items = Array.isArray(list) ? list : list.data || [];
    const names = items.map((a) => (typeof a === "string" ? a : a?.name || a?.id)).filter(Boolean);
    if (names.length) return names;
  }
  const ex = uploadSchema.properties?.architecture?.examples;
  return Array.isArray(ex) ? ex : [];
}

/**
 * A form generated from a request schema that posts with `send(values)`; after success it calls
 * `done(reply)`. `fields` are laid out first, `extra` below them; `read` (default: `fields`) are
 * the fields whose values are sent. Returns the <form>.
 */
export function registerForm({ id, fields, submitLabel, send, done, extra = null, read = fields }) {
  const message = h("div", { class: "form-message" });
  const bar = h("div");
  const submit = h("button", { type: "submit", class: "primary" }, submitLabel);
  const form = h("form", { class: "stack", id }, h("div", { class: "grid" }, fields.map((f) => f.el)), extra, bar, message,
    h("div", { class: "actions" }, submit));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.replaceChildren();
    showFieldErrors(form, null);
    submit.disabled = true;
    try {
      const reply = await send(readFields(read), (f) => bar.replaceChildren(progressBar(f, `uploading ${Math.round(100 * f)} %`)));
      form.reset();
      message.replaceChildren(note("info", done(reply)));
    } catch (err) {
      const rest = showFieldErrors(form, err.problem);
      message.replaceChildren(rest.length || !err.problem?.errors ? errorNote(err) : note("error", "Please correct the fields marked in red."));
    } finally {
      submit.disabled = false;
      bar.replaceChildren();
    }
  });
  return form;
}

/** multipart/form-data from {name: value} (files as they are, everything else as text). */
export function multipart(values) {
  const data = new FormData();
  for (const [k, v] of Object.entries(values)) data.append(k, v instanceof File ? v : Array.isArray(v) ? v.join(",") : String(v));
  return data;
}

export async function modelsView(root, { signal }) {
  const [openapi, datasets] = await Promise.all([api.schema(), api.getAll("v1/datasets")]);
  const uploadSchema = bodySchema(openapi, "/v1/models", "multipart/form-data");
  const zooSchema = bodySchema(openapi, "/v1/models", "application/json");
  const datasetNames = [...builtinDatasets(openapi), ...datasets.map((d) => d.id)];
  const rows = h("tbody");
  const status = h("div");
  const refresh = async () => {
    const models = await api.getAll("v1/models");
    swap(rows, models, () => (models.length ? models.map((m) => modelRow(m, refresh))
      : h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No models yet: register one below."))));
    status.replaceChildren();
  };

  const uploadFields = schemaFields(uploadSchema, openapi, {
    suggestions: { architecture: await architectures(openapi, uploadSchema), dataset: datasetNames },
  });
  const upload = registerForm({
    id: "model-upload", fields: uploadFields, submitLabel: "Upload and register",
    send: (values, progress) => api.upload("v1/models", multipart(values), progress),
    done: (m) => { refresh(); return `Registered ${m.name || m.id} (${m.id}); the worker is checking the weights.`; },
  });
  // The JSON body is one of several sources (robustbench, hf-hub): one form per source the schema offers.
  const jsonForm = (source, id, caption) => {
    const schema = sourceSchema(zooSchema, source, openapi);
    if (!schema) return null;
    return registerForm({
      id, fields: schemaFields(schema, openapi, { skip: ["source", "metadata"], suggestions: { dataset: datasetNames } }),
      submitLabel: "Register",
      send: (values) => api.post("v1/models", { source, ...values }),
      done: (m) => { refresh(); return `Registered ${m.name} (${m.id}); the worker fetches and checks the weights.`; },
      extra: h("p", { class: "caption" }, caption),
    });
  };
  const zoo = jsonForm("robustbench", "model-robustbench", "A model of the RobustBench zoo, by its ID. The worker loads "
    + "its weights from the server's model folder, or downloads them where the server allows downloads.");
  const hub = jsonForm("hf-hub", "model-hub", "A timm model on the Hugging Face Hub, by its repository id. The worker "
    + "reads its config.json and weights from the server's Hugging Face cache, or downloads them where the server "
    + "allows downloads; input size, mean and std left empty come from its config.json.");
  const tabs = tabbed([["Upload weights (safetensors)", upload], ["RobustBench model", zoo], ["Hugging Face Hub (timm)", hub]]
    .filter(([, form]) => form));

  fill(root, 
    h("div", { class: "page-head" }, h("h1", {}, "Models")),
    status,
    table(["Name", h("th", { class: "hide-sm" }, "ID"), "Architecture", "Data set", h("th", { class: "hide-sm" }, "Input"),
      "Status", numHead("Clean accuracy"), numHead("Size", "hide-sm"), ""], rows, { id: "models-table" }),
    card("Register a model", tabs));
  // Validation takes a few seconds: keep the list live.
  await every(3000, refresh, signal, (err) => status.replaceChildren(errorNote(err)));
}

function modelRow(m, refresh) {
  const actions = h("div", { class: "row-actions" },
    m.status === "ready" ? h("a", { class: "button small", href: `#/new?type=finetune&model=${m.id}` }, "Fine-tune") : null,
    m.status === "ready" ? h("a", { class: "button small", href: `#/new?type=evaluate&model=${m.id}` }, "Evaluate") : null,
    m.urls?.content ? h("button", { type: "button", class: "small", onclick: () => api.download(m.urls.content, `${m.name || m.id}.safetensors`) }, "Weights") : null,
    h("button", { type: "button", class: "small danger", onclick: () => deleteThing(`v1/models/${m.id}`, `model ${m.name || m.id}`, refresh) }, "Delete"));
  return h("tr", { "data-model": m.id, "data-name": m.name || "" },
    h("td", {}, m.name || "—", m.status === "rejected" && m.error ? h("div", { class: "error small" }, m.error.message || m.error.code) : null,
      m.sanity_check?.status === "warning" ? note("warn", m.sanity_check.message) : null),
    h("td", { class: "mono hide-sm", title: m.id }, short(m.id)),
    h("td", {}, m.architecture), h("td", {}, m.dataset),
    h("td", { class: "hide-sm" }, Array.isArray(m.input_shape) ? m.input_shape.join("×") : "—"),
    h("td", {}, badge(m.status)),
    sanityCell(m.sanity_check),
    h("td", { class: "num hide-sm" }, bytes(m.size)),
    h("td", { title: `created ${ago(m.created_at)}` }, actions));
}

/** The sanity check's clean accuracy (its interval and sample in the tooltip); ⚠ marks a warning. */
function sanityCell(check) {
  const status = check?.status || "none";
  const text = typeof check?.accuracy === "number"
    ? `${status === "warning" ? "⚠ " : ""}${pct(check.accuracy)}` : "—";
  return h("td", { class: "num", "data-sanity": status, title: check?.message || "" }, text);
}

/** The option of a JSON body schema (oneOf) whose `source` is `source`, or null. */
function sourceSchema(schema, source, openapi) {
  const options = (schema.oneOf || schema.anyOf || [schema]).map((o) => deref(o, openapi));
  return options.find((o) => {
    const p = deref(o.properties?.source, openapi);
    return p.const === source || (p.enum || []).includes(source);
  }) || null;
}

/** DELETE after a confirmation; a refusal (say, a job still uses it) is shown as is. */
export async function deleteThing(path, what, refresh) {
  if (!confirm(`Delete ${what}? This cannot be undone.`)) return;
  try {
    await api.remove(path);
  } catch (err) {
    alert(err.message);
  }
  await refresh();
}

function tabbed(panes) {
  const buttons = panes.map(([label], i) => h("button", { type: "button", role: "tab", "aria-selected": i === 0 ? "true" : "false", onclick: () => pick(i) }, label));
  const bodies = panes.map(([, el], i) => h("div", { role: "tabpanel", hidden: i !== 0 }, el));
  const pick = (k) => buttons.forEach((b, i) => { b.setAttribute("aria-selected", i === k ? "true" : "false"); bodies[i].hidden = i !== k; });
  return h("div", { class: "tabs" }, h("div", { class: "tablist", role: "tablist" }, buttons), bodies);
}
