// The dashboard's entry point: hash routes to views, the API-unreachable banner, the key prompt.

import * as api from "./api.js";
import { errorNote, h } from "./dom.js";
import { jobsView } from "./views/jobs.js";

// The jobs list (the landing page) comes with the page; every other view is fetched the first
// time it is shown, so the first load stays small as the views grow.
const later = (load, name) => async (...args) => (await load())[name](...args);
const ROUTES = [
  [/^\/jobs\/([\w-]+)$/, later(() => import("./views/job.js"), "jobView")],
  [/^\/jobs$/, jobsView],
  [/^\/new$/, later(() => import("./views/newjob.js"), "newJobView")],
  [/^\/compare$/, later(() => import("./views/compare.js"), "compareView")],
  [/^\/models$/, later(() => import("./views/models.js"), "modelsView")],
  [/^\/datasets$/, later(() => import("./views/datasets.js"), "datasetsView")],
];

const view = document.getElementById("view");
let running = null;   // the AbortController of the view on screen: aborting it stops its polling

async function route() {
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const found = ROUTES.map(([re, fn]) => [path.match(re), fn]).find(([m]) => m);
  running?.abort();
  const controller = new AbortController();
  running = controller;
  for (const a of document.querySelectorAll("#nav a")) {
    const here = path === a.hash.slice(1) || (a.hash === "#/jobs" && path.startsWith("/jobs/"));
    if (here) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (!found) {
    view.replaceChildren(h("h1", {}, "Not found"), h("p", {}, "No such page. ", h("a", { href: "#/jobs" }, "Go to the jobs.")));
    return;
  }
  const [match, render] = found;
  try {
    await render(view, { match, params: new URLSearchParams(query || ""), signal: controller.signal });
  } catch (err) {
    if (controller.signal.aborted || err.name === "AbortError") return;
    const retry = err.status === 401 ? h("button", { type: "button", class: "primary", onclick: route }, "Enter an API key") : null;
    view.replaceChildren(errorNote(err), retry || "");
  }
}

// ---------------------------------------------------------------------------- API unreachable
const banner = document.getElementById("banner");
api.connection.addEventListener("change", () => {
  if (api.connection.state === "down") {
    banner.replaceChildren(
      h("strong", {}, "The robustify API is unreachable. "),
      `Nothing answers at ${api.apiRoot.origin}: the server may be stopped or the network down. `,
      "Start it with ", h("code", {}, "robustify serve"), "; this page retries every few seconds and carries on by itself.");
    banner.hidden = false;
    document.body.classList.add("offline");
  } else {
    banner.hidden = true;
    document.body.classList.remove("offline");
    route();   // draw the page again with fresh data
  }
});

// ---------------------------------------------------------------------------- the API key
const dialog = document.getElementById("key-dialog");
const form = document.getElementById("key-form");
const input = document.getElementById("key-input");
const keyError = document.getElementById("key-error");
const forget = document.getElementById("forget-key");
const showForget = () => { forget.hidden = !api.apiKey(); };

api.onKeyNeeded((detail) => new Promise((resolve) => {
  keyError.textContent = api.apiKey() ? `The stored key was refused: ${detail}` : "";
  api.forgetKey();
  showForget();
  input.value = "";
  const submit = async (event) => {
    event.preventDefault();
    keyError.textContent = "";
    try {
      await api.useKey(input.value.trim());
    } catch (err) {
      keyError.textContent = err.status === 401 ? `That key was refused: ${err.message}` : err.message;
      input.select();
      return;
    }
    finish(true);
  };
  const cancel = () => finish(false);
  const finish = (ok) => {
    form.removeEventListener("submit", submit);
    dialog.removeEventListener("cancel", cancel);
    if (dialog.open) dialog.close();
    showForget();
    resolve(ok);
  };
  form.addEventListener("submit", submit);
  dialog.addEventListener("cancel", cancel);
  dialog.showModal();
  input.focus();
}));

forget.addEventListener("click", () => {
  api.forgetKey();
  showForget();
  route();
});

window.addEventListener("hashchange", route);
showForget();
route();
