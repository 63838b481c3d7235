// Start a fine-tune, a sweep of fine-tunes or an evaluation: a form whose recipe fields and defaults
// come from the FinetuneConfig / EvaluateConfig (and SweepSpec / RecommendRule) schemas of the
// server's OpenAPI document.

import * as api from "../api.js";
import { errorNote, fill, h, link, note } from "../dom.js";
import { deref, readFields, schemaFields, showFieldErrors } from "../form.js";

const RECIPES = { finetune: "FinetuneConfig", sweep: "FinetuneConfig", evaluate: "EvaluateConfig" };
const TYPES = { finetune: "Fine-tune (W-TRADES)", sweep: "Sweep (one fine-tune per δ)", evaluate: "Evaluate" };
// Shown first; every other setting is under "More settings". Names missing from the schema are skipped.
const FEATURED = {
  finetune: ["epochs", "batch_size", "lr", "beta", "attack_steps", "validation_examples", "test_examples"],
  evaluate: ["deltas", "n_examples", "linf_attacks", "wpgd_steps", "pgd_steps"],
};
FEATURED.sweep = FEATURED.finetune;

/** Built-in data set names, as the API documents them (the `examples` of JobCreate.dataset). */
export function builtinDatasets(openapi) {
  const prop = deref(openapi.components?.schemas?.JobCreate, openapi).properties?.dataset || {};
  return Array.isArray(prop.examples) ? prop.examples.filter((v) => typeof v === "string") : [];
}

/** An Idempotency-Key: a double click or a retried request never starts the job twice. */
const newKey = () => [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");

export async function newJobView(root, { params, signal }) {
  const type = RECIPES[params.get("type")] ? params.get("type") : "finetune";
  const [openapi, models, datasets] = await Promise.all([
    api.schema(), api.getAll("v1/models", { status: "ready" }), api.getAll("v1/datasets"),
  ]);
  const recipe = deref(openapi.components?.schemas?.[RECIPES[type]], openapi);
  const threatSchema = deref(openapi.components?.schemas?.ThreatModelSpec, openapi);
  if (!recipe.properties) throw new Error(`the server's OpenAPI document has no ${RECIPES[type]} schema`);

  const switchType = (t) => {
    const next = new URLSearchParams(params);
    next.set("type", t);
    if (modelSel.value) next.set("model", modelSel.value);
    location.hash = `#/new?${next}`;
  };
  const typeSwitch = h("div", { class: "segmented", role: "radiogroup" },
    Object.keys(TYPES).map((t) => h("button", { type: "button", role: "radio", "aria-checked": t === type ? "true" : "false", onclick: () => switchType(t) },
      TYPES[t])));

  const wanted = params.get("model");
  const modelSel = h("select", { id: "f-model", name: "model_id", required: true },
    models.length ? null : h("option", { value: "" }, "no ready model"),
    // the one asked for, else the newest
    models.map((m, i) => h("option", { value: m.id, selected: wanted ? m.id === wanted : i === 0 }, `${m.name || m.id} · ${m.architecture} · ${m.dataset} (${m.id})`)));
  const builtins = builtinDatasets(openapi);
  const datasetSel = h("select", { id: "f-dataset", name: "dataset", required: true },
    h("optgroup", { label: "Built in" }, builtins.map((d) => h("option", { value: d }, d))),
    datasets.length ? h("optgroup", { label: "Uploaded" }, datasets.map((d) => h("option", { value: d.id }, `${d.name} (${d.id})`))) : null);
  const pickDataset = () => {   // the model's own data set, when it is one of the choices
    const m = models.find((x) => x.id === modelSel.value);
    if (m && [...datasetSel.options].some((o) => o.value === m.dataset)) datasetSel.value = m.dataset;
  };
  modelSel.addEventListener("change", pickDataset);
  pickDataset();

  // a sweep's radii are its list of δ
  const threatFields = schemaFields(threatSchema, openapi, { path: "threat_model.", skip: type === "sweep" ? ["delta"] : [] });
  const sweepFields = type === "sweep" ? sweepForm(openapi) : null;
  const recipeFields = schemaFields(recipe, openapi, { path: "config.", skip: ["threat_model"] });
  const featured = FEATURED[type].map((n) => recipeFields.find((f) => f.name === n)).filter(Boolean);
  const more = recipeFields.filter((f) => !featured.includes(f));

  const message = h("div", { class: "form-message" });
  const submit = h("button", { type: "submit", class: "primary" }, { finetune: "Start fine-tune", sweep: "Start sweep", evaluate: "Start evaluation" }[type]);
  let key = newKey();
  const form = h("form", { class: "stack", id: "new-job", novalidate: false },
    h("fieldset", {}, h("legend", {}, "Model and data"), h("div", { class: "grid two" },
      h("div", { class: "field", "data-field": "model_id" }, h("label", { for: "f-model" }, "Model *"), modelSel,
        models.length ? null : h("small", {}, link("#/models", "Register a model"), " first; it can be used once it is ready.")),
      h("div", { class: "field", "data-field": "dataset" }, h("label", { for: "f-dataset" }, "Data set *"), datasetSel,
        h("small", {}, "Built-in data sets need no upload; ", link("#/datasets", "upload your own"), ".")))),
    h("fieldset", {}, h("legend", {}, "Threat model"), h("div", { class: "grid" }, threatFields.map((f) => f.el))),
    sweepFields?.el,
    h("fieldset", {}, h("legend", {}, type === "evaluate" ? "Evaluation" : type === "sweep" ? "Recipe of every fine-tune" : "Recipe"),
      h("div", { class: "grid" }, featured.map((f) => f.el)),
      more.length ? h("details", {}, h("summary", {}, `More settings (${more.length})`), h("div", { class: "grid" }, more.map((f) => f.el))) : null),
    message,
    h("div", { class: "actions" }, submit));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.replaceChildren();
    const body = { type, model_id: modelSel.value, dataset: datasetSel.value, config: readFields(recipeFields) };
    const threat = readFields(threatFields);
    if (Object.keys(threat).length) body.threat_model = threat;
    if (sweepFields) Object.assign(body, sweepFields.read());
    submit.disabled = true;
    try {
      const job = await api.post("v1/jobs", body, { "Idempotency-Key": key });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      key = newKey();   // the request was refused: a corrected one is a new request
      const rest = showFieldErrors(form, err.problem);
      message.replaceChildren(rest.length || !err.problem?.errors ? errorNote(err) : note("error", "Please correct the fields marked in red."));
    } finally {
      submit.disabled = false;
    }
  });
  if (signal.aborted) return;
  fill(root, 
    h("div", { class: "page-head" }, h("h1", {}, "New job"), typeSwitch),
    h("p", { class: "muted" }, {
      finetune: "Fine-tune the model with W-TRADES against Wasserstein-2 distributional attacks. Every setting starts at the server's default; only the ones you change are sent.",
      sweep: "Fine-tune the model once per radius δ (and β or attack schedule), each an ordinary fine-tune, and see the frontier of clean against robust accuracy; "
        + "a rule you state recommends one, which you can promote to a model in one click.",
      evaluate: "Measure clean, W2 distributional and pointwise robust accuracy, at one radius or along several (a robustness curve).",
    }[type]),
    form);
}

/** The sweep's own fields: the values to fine-tune with (SweepSpec) and the rule that picks one (RecommendRule). */
function sweepForm(openapi) {
  const job = deref(openapi.components?.schemas?.JobCreate, openapi).properties || {};
  const part = (name) => deref((job[name]?.anyOf || []).find((o) => o.$ref) || job[name], openapi);
  const values = schemaFields(part("sweep"), openapi, { path: "sweep." });
  const rule = schemaFields(part("recommend"), openapi, { path: "recommend." });
  values.find((f) => f.name === "delta")?.el.querySelector("input")?.setAttribute("placeholder", "e.g. 0.05, 0.1, 0.2");
  return {
    el: h("fieldset", { id: "sweep-fields" }, h("legend", {}, "Sweep"), h("div", { class: "grid" }, values.map((f) => f.el), rule.map((f) => f.el))),
    read: () => {
      const out = { sweep: readFields(values) };
      const r = readFields(rule);
      if (Object.keys(r).length) out.recommend = r;
      return out;
    },
  };
}
