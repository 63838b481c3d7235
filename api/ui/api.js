// The one module that talks to the robustify API: the key, requests and their problems,
// connection state, the event stream, uploads and downloads. Views never call fetch themselves.

const KEY = "robustify.apiKey";

// The dashboard lives at <root>/ui/; the API at <root>/ (so it also works under a proxy prefix).
export const apiRoot = new URL("../", location.href);
const url = (path, params) => {
  const u = new URL(path.replace(/^\//, ""), apiRoot);
  for (const [k, v] of Object.entries(params || {})) if (v !== undefined && v !== null && v !== "") u.searchParams.set(k, v);
  return u;
};

// ---------------------------------------------------------------------------- errors
/** An API failure: `problem` is the RFC 9457 body (code, detail, errors[]), status 0 = unreachable. */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
    this.code = problem.code || (status === 0 ? "unreachable" : "error");
  }
}

async function problemOf(res) {
  const text = await res.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body === "object") return body;
  } catch { /* not JSON: a proxy's error page */ }
  return { title: res.statusText, detail: `HTTP ${res.status} ${res.statusText}: ${text.slice(0, 200)}` };
}

// ---------------------------------------------------------------------------- connection state
/** "up" | "down": fires "change" when the API stops or starts answering. */
export const connection = new EventTarget();
connection.state = "up";
let pinger = null;

function markUp() {
  if (connection.state === "up") return;
  connection.state = "up";
  clearInterval(pinger);
  pinger = null;
  connection.dispatchEvent(new Event("change"));
}

function markDown() {
  if (connection.state === "down") return;
  connection.state = "down";
  connection.dispatchEvent(new Event("change"));
  // Ask /healthz until the server answers again; the app then redraws the page.
  pinger = setInterval(async () => {
    try {
      if ((await fetch(url("healthz"), { cache: "no-store" })).ok) markUp();
    } catch { /* still down */ }
  }, 2000);
}

const unreachable = () => new ApiError(0, {
  code: "unreachable", title: "API unreachable",
  detail: `cannot reach the robustify API at ${apiRoot.origin}: is the server running?`,
});

// ---------------------------------------------------------------------------- the key
export const apiKey = () => sessionStorage.getItem(KEY);
export const forgetKey = () => sessionStorage.removeItem(KEY);

let askForKey = null;   // set by the app: async (message) => true once a working key is stored
let asking = null;      // one prompt for all the requests that got a 401 at the same time
export function onKeyNeeded(fn) { askForKey = fn; }

/** Try a key against the API; stores it and resolves true when the API accepts it. */
export async function useKey(key) {
  let res;
  try {
    res = await fetch(url("v1/jobs", { limit: 1 }), { headers: { Authorization: `Bearer ${key}` } });
  } catch {
    markDown();
    throw unreachable();
  }
  markUp();
  if (!res.ok) throw new ApiError(res.status, await problemOf(res));
  sessionStorage.setItem(KEY, key);
  return true;
}

async function keyPrompt(detail) {
  if (!askForKey) return false;
  asking ||= askForKey(detail).finally(() => { asking = null; });
  return asking;
}

const authHeaders = () => (apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {});

// ---------------------------------------------------------------------------- requests
async function send(path, { params, signal, retried = false, ...init } = {}) {
  let res;
  try {
    res = await fetch(url(path, params), { ...init, signal, headers: { Accept: "application/json", ...init.headers, ...authHeaders() } });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    markDown();
    throw unreachable();
  }
  markUp();
  if (res.status === 401 && !retried) {
    const problem = await problemOf(res);
    if (await keyPrompt(problem.detail)) return send(path, { params, signal, retried: true, ...init });
    throw new ApiError(401, problem);
  }
  if (!res.ok) throw new ApiError(res.status, await problemOf(res));
  return res;
}

export const get = async (path, params, signal) => (await send(path, { params, signal })).json();

export const post = async (path, body, headers = {}) => (await send(path, {
  method: "POST", body: body === undefined ? undefined : JSON.stringify(body),
  headers: body === undefined ? headers : { "Content-Type": "application/json", ...headers },
})).json();

export const remove = async (path) => (await send(path, { method: "DELETE" })).json();

/** Every page of a list endpoint (`{data, has_more, last_id}`), up to `max` items. */
export async function getAll(path, params = {}, max = 500) {
  const items = [];
  let after;
  for (;;) {
    const page = await get(path, { ...params, limit: 100, after });
    items.push(...(page.data || []));
    if (!page.has_more || items.length >= max || !page.last_id) return items;
    after = page.last_id;
  }
}

/** Items of a list endpoint by id (to show names in tables); fetched again only when an unknown id turns up. */
function indexOf(path) {
  const items = new Map();
  let loaded = false;
  return async (ids = []) => {
    if (!loaded || ids.some((id) => id && !items.has(id))) {
      for (const item of await getAll(path)) items.set(item.id, item);
      for (const id of ids) if (id && !items.has(id)) items.set(id, null);   // deleted: the id is shown
      loaded = true;
    }
    return items;
  };
}
export const modelIndex = indexOf("v1/models");
const uploadedDatasets = indexOf("v1/datasets");
/** Uploaded data sets by id; a built-in data set (not an upload) is named by its id and not looked up. */
export const datasetIndex = (ids = []) => uploadedDatasets(ids.filter((id) => typeof id === "string" && id.startsWith("ds_")));

let openapi = null;
/** The server's OpenAPI document (recipe schemas, upload forms), fetched once per page load. */
export async function schema() {
  openapi ||= send("openapi.json").then((r) => r.json()).catch((err) => { openapi = null; throw err; });
  return openapi;
}

// ---------------------------------------------------------------------------- the event stream
/**
 * A job's events as they happen (Server-Sent Events read through fetch, so the key travels in
 * the Authorization header, which EventSource cannot send). Calls onEvent(event) for each; resolves
 * when the server closes the stream (the job reached a final state), reconnecting after a drop.
 */
export async function followEvents(jobId, onEvent, signal) {
  let after = 0;
  for (;;) {
    let res;
    try {
      res = await send(`v1/jobs/${jobId}/events`, { params: { after }, signal, headers: { Accept: "text/event-stream" } });
    } catch (err) {
      if (err.name === "AbortError" || err.status !== 0) throw err;
      await waitUp(signal);
      continue;
    }
    try {
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (!data) continue;   // a retry: or keep-alive line
          const event = JSON.parse(data);
          after = Math.max(after, event.id || 0);
          onEvent(event);
        }
      }
    } catch (err) {
      if (err.name === "AbortError" || signal?.aborted) throw err;
      markDown();   // the connection dropped mid-stream: resume after the last event seen
      await waitUp(signal);
    }
  }
}

function waitUp(signal) {
  return new Promise((resolve, reject) => {
    if (connection.state === "up") return setTimeout(resolve, 1000);
    const done = () => { connection.removeEventListener("change", done); resolve(); };
    connection.addEventListener("change", done);
    signal?.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError")));
  });
}

// ---------------------------------------------------------------------------- files
/** POST multipart form data with upload progress (fetch has none); resolves with the JSON reply. */
export function upload(path, form, onProgress, retried = false) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url(path));
    xhr.setRequestHeader("Accept", "application/json");
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress?.(e.loaded / e.total);
    xhr.onerror = () => { markDown(); reject(unreachable()); };
    xhr.onload = async () => {
      markUp();
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch { body = { detail: xhr.responseText.slice(0, 200) }; }
      if (xhr.status === 401 && !retried && await keyPrompt(body.detail)) {
        return upload(path, form, onProgress, true).then(resolve, reject);
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body));
    };
    xhr.send(form);
  });
}

/** Save a file the API serves (weights, checkpoints). Without a key the browser streams it itself;
 *  with one, it is fetched with the Authorization header and handed over as a blob. */
export async function download(path, filename) {
  const a = document.createElement("a");
  a.download = filename || "";
  if (apiKey()) {
    const res = await send(path, { headers: { Accept: "application/octet-stream" } });
    const name = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(res.headers.get("content-disposition") || "");
    a.download = filename || (name ? decodeURIComponent(name[1]) : "download.safetensors");
    a.href = URL.createObjectURL(await res.blob());
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
  } else {
    a.href = url(path).href;
  }
  document.body.append(a);
  a.click();
  a.remove();
}
