// Small DOM and formatting helpers the views share.

/** h("a", {href, class, onclick}, children…): an element; strings become text (never HTML). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style") Object.assign(el.style, v);   // CSSOM: the CSP forbids style="" attributes
    // as attributes too, so that form.reset() returns to them
    else if (k === "value") { el.value = v; if (el instanceof HTMLInputElement) el.defaultValue = String(v); }
    else if (k === "checked") { el.checked = !!v; el.defaultChecked = !!v; }
    else if (k === "selected") { el.selected = !!v; el.defaultSelected = !!v; }
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  el.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : String(c))));
  return el;
}

export const pct = (v, digits = 1) => (typeof v === "number" && Number.isFinite(v) ? `${(100 * v).toFixed(digits)} %` : "—");

/** A signed change in percentage points: "+8.0 pp". */
export const points = (v) => (typeof v === "number" && Number.isFinite(v)
  ? `${v > 0 ? "+" : v < 0 ? "−" : "±"}${Math.abs(100 * v).toFixed(1)} pp` : "—");

export function duration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "—";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function ago(iso) {
  if (!iso) return "—";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (!Number.isFinite(s)) return "—";
  if (s < 5) return "just now";
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

export const clock = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "");

export function bytes(n) {
  if (typeof n !== "number") return "—";
  const units = ["B", "kB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export const badge = (status) => h("span", { class: `badge s-${status}`, "data-status": status }, status || "unknown");

export function progressBar(fraction, label) {
  return h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(100 * fraction) },
    h("div", { class: "bar", style: { width: `${(100 * fraction).toFixed(1)}%` } }),
    h("span", {}, label ?? `${Math.round(100 * fraction)} %`));
}

/** A card: a titled section of a page. */
export const card = (title, ...body) => h("section", { class: "card" }, title ? h("h2", {}, title) : null, ...body);

/** A table that scrolls sideways on a narrow screen instead of squeezing its columns. */
export function table(headers, body, attrs = {}) {
  const tbody = body instanceof HTMLTableSectionElement ? body : h("tbody", {}, body);   // rows, or a live <tbody>
  return h("div", { class: "table-wrap" }, h("table", attrs,
    h("thead", {}, h("tr", {}, headers.map((c) => (c instanceof Node ? c : h("th", {}, c))))), tbody));
}

/** A header cell over a column of numbers (right-aligned like them). */
export const numHead = (text, cls = "") => h("th", { class: `num ${cls}`.trim() }, text);

/** A message box: kind "error" | "warn" | "info". */
export const note = (kind, ...text) => h("div", { class: `note ${kind}`, role: kind === "error" ? "alert" : "status" }, ...text);

/** An ApiError (or anything thrown) as a message a person can act on. */
export function errorNote(err) {
  const p = err?.problem || {};
  const fields = Array.isArray(p.errors) && p.errors.length
    ? h("ul", {}, p.errors.map((e) => h("li", {}, `${e.field || (e.loc || []).join(".")}: ${e.msg}`))) : null;
  const again = err?.status === 401 ? " Reload the page to enter an API key." : "";
  return note("error", h("strong", {}, p.code ? `${p.code}: ` : ""), err?.message || String(err), again, fields);
}

export const short = (id) => (typeof id === "string" && id.length > 14 ? `${id.slice(0, 12)}…` : id || "—");

export const link = (hash, text, attrs = {}) => h("a", { href: hash, ...attrs }, text);

/**
 * Run `fn` now and then every `ms` while the tab is visible, until `signal` aborts. An unreachable
 * API is the banner's business; other failures go to `onError`. Resolves after the first run.
 */
export function every(ms, fn, signal, onError) {
  let timer;
  const tick = async () => {
    if (signal.aborted) return;
    if (!document.hidden) {
      try {
        await fn();
      } catch (err) {
        if (err.name !== "AbortError" && err.status !== 0) onError?.(err);
      }
    }
    if (!signal.aborted) timer = setTimeout(tick, ms);
  };
  signal.addEventListener("abort", () => clearTimeout(timer));
  return tick();
}

/** Replace el's content with build()'s only when `key` differs from the last time. */
export function swap(el, key, build) {
  const sig = JSON.stringify(key);
  if (el.dataset.sig === sig) return;
  el.dataset.sig = sig;
  el.replaceChildren(...[build()].flat().filter(Boolean));
}

/** el.replaceChildren without the nulls that conditional parts leave (replaceChildren prints "null"). */
export const fill = (el, ...children) => el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
