// Form fields generated from the JSON Schemas in the server's OpenAPI document, so the forms
// follow the API: a new recipe setting or upload field appears by itself, with its default,
// limits and description. Only values a person changed are sent; the server fills the rest.

import { h } from "./dom.js";

/** The schema behind a $ref ("#/components/schemas/X"), or the schema itself. */
export function deref(schema, openapi) {
  let s = schema || {};
  for (let i = 0; s.$ref && i < 10; i += 1) s = s.$ref.split("/").slice(1).reduce((o, k) => o?.[k], openapi) || {};
  return s;
}

/** {schema, nullable}: anyOf [X, null] unwrapped to X. */
function unwrap(prop, openapi) {
  const p = deref(prop, openapi);
  const options = (p.anyOf || p.oneOf || []).map((o) => deref(o, openapi));
  if (!options.length) return { schema: p, nullable: false };
  const real = options.filter((o) => o.type !== "null");
  const merged = real.length === 1 ? { ...real[0], ...p, anyOf: undefined, oneOf: undefined } : { ...p, mixed: real };
  return { schema: merged, nullable: real.length < options.length };
}

// Labels: a title the schema gives on purpose, else the field's name in words.
const LABELS = { lr: "Learning rate", delta: "Radius δ", num_classes: "Number of classes" };
const TERMS = { wpgd: "W-PGD", pgd: "PGD", linf: "l∞", ema: "EMA", amp: "AMP", aa: "AA" };
function words(name, s) {
  const parts = name.split("_");
  const automatic = parts.map((w) => w.charAt(0).toUpperCase() + w.slice(1)).join(" ");   // pydantic's own title
  if (LABELS[name]) return LABELS[name];
  if (s.title && s.title !== automatic) return s.title;
  const text = parts.map((w) => TERMS[w] || w).join(" ");
  return text.charAt(0).toUpperCase() + text.slice(1);
}
const shown = (v) => (Array.isArray(v) ? v.join(", ") : typeof v === "number" ? `${+v.toPrecision(6)}` : `${v}`);
// A hint is the schema's description for someone filling in a form: pointers into the source code
// ("(core.engine.defaults)") are for developers reading the API reference, so the form leaves them out.
const SOURCE_REF = /\s*\((?:core|api|worker|cli)\.[\w.]+\)/g;
const plain = (text) => (typeof text === "string" ? text.replace(SOURCE_REF, "") : text);

/**
 * One field for property `name` of a schema: {name, el, read()} where read() gives the value to
 * send, or undefined to leave it to the server's default. `path` prefixes the input's name
 * (e.g. "config."), which is also how the API names a field in a 422 (`field`).
 */
export function schemaField(name, prop, openapi, { path = "", required = false, suggestions = null } = {}) {
  const { schema: s, nullable } = unwrap(prop, openapi);
  const id = `f-${path}${name}`.replace(/[^\w-]/g, "-");
  const inputName = `${path}${name}`;
  const hasDefault = "default" in s && s.default !== null;
  const choices = s.type === "array" && Array.isArray(deref(s.items, openapi).enum);
  const hint = [plain(s.description), hasDefault ? `default ${shown(s.default)}`
    : choices ? "none ticked: the server's default" : nullable ? "optional" : null].filter(Boolean).join(" · ");
  let input;
  let read;

  if (s.type === "object" || (s.$ref && !s.type)) return null;   // nested objects get their own fields
  if (s.format === "binary") {
    input = h("input", { id, name: inputName, type: "file", required, accept: /safetensors/i.test(s.description || "") ? ".safetensors" : null });
    read = () => input.files[0];
  } else if (Array.isArray(s.enum)) {
    input = h("select", { id, name: inputName, required },
      !hasDefault ? h("option", { value: "" }, required ? "choose…" : "(server default)") : null,
      s.enum.map((v) => h("option", { value: v, selected: v === s.default }, v)));
    // a <select> holds text: compare with the default as text, send numbers as numbers
    const numeric = s.type === "integer" || s.type === "number";
    read = () => (input.value === "" || (hasDefault && input.value === String(s.default)) ? undefined
      : numeric ? Number(input.value) : input.value);
  } else if (s.type === "boolean") {
    input = h("input", { id, name: inputName, type: "checkbox", checked: !!s.default });
    read = () => (input.checked === !!s.default ? undefined : input.checked);
  } else if (choices) {
    const options = deref(s.items, openapi).enum;
    const boxes = options.map((v) => h("input", { type: "checkbox", name: inputName, value: v, checked: (s.default || []).includes(v) }));
    input = h("span", { class: "checks", id }, boxes.map((b, i) => h("label", { class: "inline" }, b, options[i])));
    read = () => {
      const picked = boxes.filter((b) => b.checked).map((b) => b.value);
      return picked.length ? picked : undefined;   // none ticked: the server's default
    };
  } else if (s.type === "array") {
    input = h("input", { id, name: inputName, type: "text", inputmode: "decimal", placeholder: "numbers, comma-separated", value: hasDefault ? shown(s.default) : "" });
    read = () => {
      const text = input.value.trim();
      if (!text || (hasDefault && text === shown(s.default))) return undefined;
      return text.split(/[\s,;]+/).filter(Boolean).map((t) => (Number.isFinite(Number(t)) ? Number(t) : t));
    };
  } else if (s.type === "integer" || s.type === "number") {
    input = h("input", {
      id, name: inputName, type: "number", required, step: s.type === "integer" ? 1 : "any",
      min: s.minimum ?? null, max: s.maximum ?? null, value: hasDefault ? s.default : "",
      placeholder: nullable && !hasDefault ? "default" : null,
    });
    read = () => (input.value === "" || Number(input.value) === s.default ? undefined : Number(input.value));
  } else {
    // Strings, and unions such as an integer or "auto": sent as a number when it reads as one.
    const list = suggestions?.length ? h("datalist", { id: `${id}-options` }, suggestions.map((v) => h("option", { value: v }))) : null;
    const example = Array.isArray(s.examples) && s.examples.length ? `e.g. ${shown(s.examples[0])}` : null;
    input = h("input", { id, name: inputName, type: "text", required, list: list ? `${id}-options` : null, value: hasDefault ? shown(s.default) : "", spellcheck: "false", placeholder: example });
    read = () => {
      const text = input.value.trim();
      if (!text || (hasDefault && text === shown(s.default))) return undefined;
      return s.mixed && Number.isFinite(Number(text)) ? Number(text) : text;
    };
    const el = h("div", { class: "field", "data-field": inputName }, h("label", { for: id }, words(name, s), required ? " *" : ""), input, list, hint ? h("small", {}, hint) : null);
    return { name, el, read };
  }
  const el = s.type === "boolean"
    ? h("div", { class: "field", "data-field": inputName }, h("label", { class: "inline", for: id }, input, words(name, s)), hint ? h("small", {}, hint) : null)
    : h("div", { class: "field", "data-field": inputName }, h("label", { for: id }, words(name, s), required ? " *" : ""), input, hint ? h("small", {}, hint) : null);
  return { name, el, read };
}

/** Fields for every property of an object schema (minus `skip`), required ones first. */
export function schemaFields(objectSchema, openapi, { path = "", skip = [], suggestions = {} } = {}) {
  const s = deref(objectSchema, openapi);
  const required = new Set(s.required || []);
  const names = Object.keys(s.properties || {}).filter((n) => !skip.includes(n));
  names.sort((a, b) => required.has(b) - required.has(a));
  return names.map((n) => schemaField(n, s.properties[n], openapi, { path, required: required.has(n), suggestions: suggestions[n] }))
    .filter(Boolean);
}

/** {name: value} of the fields a person set. */
export function readFields(fields) {
  const out = {};
  for (const f of fields) {
    const v = f.read();
    if (v !== undefined) out[f.name] = v;
  }
  return out;
}

/** Show a 422's per-field messages next to the fields they name; returns the ones left over. */
export function showFieldErrors(form, problem) {
  for (const old of form.querySelectorAll(".field-error")) old.remove();
  for (const el of form.querySelectorAll(".field.invalid")) el.classList.remove("invalid");
  const rest = [];
  for (const e of problem?.errors || []) {
    const name = e.field || (e.loc || []).filter((p) => p !== "body").join(".");
    const field = [...form.querySelectorAll(".field")].find((f) => f.dataset.field === name);
    if (field) {
      field.closest("details")?.setAttribute("open", "");   // never hide a message in a folded section
      field.classList.add("invalid");
      field.append(h("small", { class: "field-error" }, e.msg));
    } else {
      rest.push(e);
    }
  }
  return rest;
}
