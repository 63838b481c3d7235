// Start a fine-tune or an evaluation: a form whose recipe fields and defaults come from the
// FinetuneConfig / EvaluateConfig schemas of the server's OpenAPI document.

import * as api from "../api.js";
import { errorNote, fill, h, link, note } from "../dom.js";
import { deref, readFields, schemaFields, showFieldErrors } from "../form.js";

const RECIPES = { finetune: "FinetuneConfig", evaluate: "EvaluateConfig" };
// Shown first; every other setting is under "More settings". Names missing from the schema are skipped.
const FEATURED = {
  finetune: ["epochs", "batch_size", "lr", "beta", "attack_steps", "validation_examples", "test_examples"],
  evaluate: ["deltas", "n_examples", "linf_attacks", "wpgd_steps", "pgd_steps"],
};

/** Built-in data set names, as the API documents them (the `examples` of JobCreate.dataset). */
export function builtinDatasets(openapi) {
  const prop = deref(openapi.components?.schemas?.JobCreate, openapi).properties?.dataset || {};
  return Array.isArray(prop.examples) ? prop.examples.filter((v) => typeof v === "string") : [];
}

/** An Idempotency-Key: a double click or a retried request never starts the job twice. */
const newKey = () => [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");

export async function newJobView(root, { params, signal }) {
  const type = params.get("type") === "evaluate" ? "evaluate" : "finetune";
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
    ["finetune", "evaluate"].map((t) => h("button", { type: "button", role: "radio", "aria-checked": t === type ? "true" : "false", onclick: () => switchType(t) },
      t === "finetune" ? "Fine-tune (W-TRADES)" : "Evaluate")));

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

  const threatFields = schemaFields(threatSchema, openapi, { path: "threat_model." });
  const recipeFields = schemaFields(recipe, openapi, { path: "config.", skip: ["threat_model"] });
  const featured = FEATURED[type].map((n) => recipeFields.find((f) => f.name === n)).filter(Boolean);
  const more = recipeFields.filter((f) => !featured.includes(f));

  const message = h("div", { class: "form-message" });
  const submit = h("button", { type: "submit", class: "primary" }, type === "finetune" ? "Start fine-tune" : "Start evaluation");
  let key = newKey();
  const form = h("form", { class: "stack", id: "new-job", novalidate: false },
    h("fieldset", {}, h("legend", {}, "Model and data"), h("div", { class: "grid two" },
      h("div", { class: "field", "data-field": "model_id" }, h("label", { for: "f-model" }, "Model *"), modelSel,
        models.length ? null : h("small", {}, link("#/models", "Register a model"), " first; it can be used once it is ready.")),
      h("div", { class: "field", "data-field": "dataset" }, h("label", { for: "f-dataset" }, "Data set *"), datasetSel,
        h("small", {}, "Built-in data sets need no upload; ", link("#/datasets", "upload your own"), ".")))),
    h("fieldset", {}, h("legend", {}, "Threat model"), h("div", { class: "grid" }, threatFields.map((f) => f.el))),
    h("fieldset", {}, h("legend", {}, type === "finetune" ? "Recipe" : "Evaluation"),
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
    h("p", { class: "muted" }, type === "finetune"
      ? "Fine-tune the model with W-TRADES against Wasserstein-2 distributional attacks. Every setting starts at the server's default; only the ones you change are sent."
      : "Measure clean, W2 distributional and pointwise robust accuracy, at one radius or along several (a robustness curve)."),
    form);
}
