// Data sets: the built-in ones, uploaded ones (list, upload, delete).

import * as api from "../api.js";
import { ago, bytes, card, errorNote, every, fill, h, numHead, short, swap, table } from "../dom.js";
import { schemaFields } from "../form.js";
import { censusOf } from "../results.js";
import { bodySchema, deleteThing, multipart, registerForm } from "./models.js";
import { builtinDatasets } from "./newjob.js";

export async function datasetsView(root, { signal }) {
  const openapi = await api.schema();
  const rows = h("tbody");
  const status = h("div");
  const warnings = h("div", { id: "dataset-warnings" });
  const refresh = async () => {
    const datasets = await api.getAll("v1/datasets");
    swap(warnings, datasets.map((d) => [d.id, d.warnings]), () => datasets.flatMap((d) => censusOf(d).warnings.map((w) =>
      h("div", { class: "note warn", role: "status", "data-dataset": d.id, "data-code": w.code }, h("strong", {}, `${d.name}: `), w.message))));
    swap(rows, datasets, () => (datasets.length ? datasets.map((d) => h("tr", { "data-dataset": d.id },
      h("td", {}, d.name), h("td", { class: "mono hide-sm", title: d.id }, short(d.id)),
      h("td", { class: "num" }, d.num_examples ?? "—"), h("td", { class: "num" }, d.num_classes ?? "—"), censusCell(d),
      h("td", { class: "hide-sm" }, Array.isArray(d.image_shape) ? d.image_shape.join("×") : "—"),
      h("td", { class: "num hide-sm" }, bytes(d.size)), h("td", { class: "hide-sm" }, ago(d.created_at)),
      h("td", {}, h("button", { type: "button", class: "small danger", onclick: () => deleteThing(`v1/datasets/${d.id}`, `data set ${d.name}`, refresh) }, "Delete"))))
      : h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No uploaded data sets."))));
    status.replaceChildren();
  };
  const schema = bodySchema(openapi, "/v1/datasets", "multipart/form-data");
  const fields = schemaFields(schema, openapi);
  // Fields that only shape how a .zip / .tar of class folders is decoded: a group of their own
  // (left untouched they are not sent, so an .npz upload never carries them).
  const archiveOnly = (f) => schema.properties?.[f.name]?.["x-archive-only"] === true;
  const archive = fields.filter(archiveOnly);
  const form = registerForm({
    id: "dataset-upload", fields: fields.filter((f) => !archiveOnly(f)), read: fields, submitLabel: "Upload",
    send: (values, progress) => api.upload("v1/datasets", multipart(values), progress),
    done: (d) => {
      refresh();
      const { warnings: found } = censusOf(d);
      return `Uploaded ${d.name} (${d.id}): ${d.num_examples} images, ${d.num_classes} classes`
        + (found.length ? `; ${found.length} census warning${found.length > 1 ? "s" : ""}: ${found.map((w) => w.message).join(" ")}` : ".");
    },
    extra: archive.length ? h("fieldset", { id: "archive-options" },
      h("legend", {}, "Image-folder archives (.zip / .tar) only"),
      h("p", { class: "caption" }, "How the images are resized, coloured and split; an .npz is stored as it is."),
      h("div", { class: "grid" }, archive.map((f) => f.el))) : null,
  });
  const builtins = builtinDatasets(openapi);
  fill(root, 
    h("div", { class: "page-head" }, h("h1", {}, "Data sets")),
    builtins.length ? h("p", {}, "Built in (no upload needed): ", builtins.map((b, i) => [i ? ", " : "", h("code", {}, b)]), ".") : null,
    status,
    warnings,
    table(["Name", h("th", { class: "hide-sm" }, "ID"), numHead("Images"), numHead("Classes"), "Images per class", h("th", { class: "hide-sm" }, "Image shape"),
      numHead("Size", "hide-sm"), h("th", { class: "hide-sm" }, "Uploaded"), ""], rows, { id: "datasets-table" }),
    card("Upload a data set", form));
  await every(10000, refresh, signal, (err) => status.replaceChildren(errorNote(err)));
}

/** Images per class in each split (smallest–largest, the full counts on opening), and a mark per warning. */
function censusCell(d) {
  const { splits, warnings } = censusOf(d);
  if (!splits.length) return h("td", { class: "muted" }, "—");
  const range = (v) => (v.length ? `${Math.min(...v)}–${Math.max(...v)}` : "—");
  return h("td", { class: "census", "data-warnings": warnings.length },
    h("details", {}, h("summary", {}, splits.map(([split, v]) => `${split} ${range(v)}`).join(" · "),
      warnings.length ? h("span", { class: "tag warn-tag", title: warnings.map((w) => w.message).join("\n") }, `${warnings.length} warning${warnings.length > 1 ? "s" : ""}`) : null),
    table(["Class", ...splits.map(([split]) => numHead(split))],
      (d.class_names?.length ? d.class_names : splits[0][1].map((_, i) => i)).map((name, i) => h("tr", { "data-class": i },
        h("td", {}, d.class_names?.length ? `${i} ${name}` : `${i}`),
        splits.map(([, v]) => h("td", { class: `num ${v[i] === 0 ? "error" : ""}`.trim() }, v[i] ?? "—")))), { class: "census-table" })));
}
