// Models: the registry (models, versions, aliases), a version's page with promotion, and a sortable
// comparison of versions by their evaluation figures.

import { api, errorBox, fmt, h, load, openapiDocument, when } from "./api.js";

function versionHref(name, version) {
  return `#/models/${encodeURIComponent(name)}/versions/${version}`;
}

/** The version's headline figures: the head's and kNN's test macro AUROC and F1. */
export function figures(v) {
  const m = v.metrics || {};
  return {
    auroc: v.head?.test_macro_auroc ?? m.test_macro_auroc ?? null,
    f1: v.head?.test_macro_f1 ?? m.test_macro_f1 ?? null,
    knn: v.knn_reference?.test_macro_auroc ?? m.knn_test_macro_auroc ?? null,
  };
}

export async function modelsPage(view) {
  view.append(h("h1", {}, "Models"));
  const loaded = await load(view, "/models");
  if (!loaded) return;
  const [{ models }] = loaded;
  if (!models.length) view.append(h("p", { class: "muted" }, "No model is registered yet: submit a pretraining job."));
  for (const model of models) {
    view.append(
      h("h2", {}, model.name, h("span", { class: "muted" }, ` · ${model.method}`)),
      h("p", {}, "aliases: ", Object.entries(model.aliases).map(([alias, version]) => h("span", { class: "alias" }, `${alias} → ${version} `)), Object.keys(model.aliases).length ? "" : "none"),
      h("table", { class: "versions", "data-model": model.name },
        h("thead", {}, h("tr", {}, ["version", "aliases", "source job", "input", "embedding", "macro AUROC", "kNN AUROC", "created"].map((c) => h("th", {}, c)))),
        h("tbody", {}, model.versions.map((v) => {
          const f = figures(v);
          return h("tr", {},
            h("td", {}, h("a", { href: versionHref(model.name, v.version) }, v.ref)),
            h("td", {}, v.aliases.join(", ")),
            h("td", {}, v.source_job_id ? h("a", { href: `#/jobs/${v.source_job_id}` }, v.source_job_id.slice(0, 8)) : "–"),
            h("td", {}, `${v.input_spec.leads.length} leads, ${v.input_spec.fs} Hz, ${v.input_spec.samples / v.input_spec.fs} s`),
            h("td", { class: "num" }, v.embedding_dim),
            h("td", { class: "num" }, fmt(f.auroc, 3)),
            h("td", { class: "num" }, fmt(f.knn, 3)),
            h("td", {}, when(v.created_at)));
        }))),
    );
  }
}

function keyValues(object) {
  const cell = (v) => {
    if (Array.isArray(v) && v.every((x) => x === null || typeof x !== "object")) return v.map((x) => fmt(x)).join(", ");
    return typeof v === "object" && v !== null ? h("pre", {}, JSON.stringify(v, null, 2)) : fmt(v);
  };
  return h("table", {}, h("tbody", {}, Object.entries(object || {}).map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, cell(v))))));
}

export async function versionPage(view, name, number) {
  let v;
  try {
    v = await api(`/models/${encodeURIComponent(name)}/versions/${number}`);
  } catch (error) {
    view.append(h("h1", {}, `${name}@${number}`), errorBox(error));
    return;
  }
  const document = await openapiDocument();
  const hasCard = "/models/{name}/versions/{version}/card" in document.paths || "/models/{name}/versions/{n}/card" in document.paths;
  const aliasInput = h("input", { id: "alias-name", name: "alias", value: "production", size: 16 });
  const aliasMessage = h("div", { id: "alias-message" });
  const promote = h("button", { id: "promote", type: "button" }, `Point alias at version ${v.version}`);
  promote.addEventListener("click", async () => {
    aliasMessage.replaceChildren();
    try {
      const out = await api(`/models/${encodeURIComponent(name)}/aliases/${encodeURIComponent(aliasInput.value.trim())}`, { method: "PUT", json: { version: v.version } });
      aliasMessage.replaceChildren(h("p", { class: "ok" }, `${out.model}@${out.alias} → version ${out.version}` + (out.previous_version ? ` (was ${out.previous_version})` : " (new alias)")));
      aliases.textContent = [...new Set([...v.aliases, out.alias])].join(", ");
    } catch (error) {
      aliasMessage.replaceChildren(errorBox(error));
    }
  });
  const aliases = h("span", { id: "version-aliases" }, v.aliases.join(", ") || "none");
  const f = figures(v);
  view.append(
    h("h1", {}, v.ref, h("span", { class: "muted" }, ` · ${v.method}`)),
    h("p", {}, "aliases: ", aliases),
    h("p", {}, h("label", {}, "alias ", aliasInput), " ", promote),
    aliasMessage,
    h("div", { class: "grid" },
      h("div", { class: "card" }, h("div", { class: "label" }, "macro AUROC (test)"), h("div", { class: "value" }, fmt(f.auroc, 3))),
      h("div", { class: "card" }, h("div", { class: "label" }, "kNN macro AUROC (test)"), h("div", { class: "value" }, fmt(f.knn, 3))),
      h("div", { class: "card" }, h("div", { class: "label" }, "PyTorch vs ONNX parity"), h("div", { class: "value" }, fmt(v.parity_max_abs_diff, 3))),
      h("div", { class: "card" }, h("div", { class: "label" }, "embedding"), h("div", { class: "value" }, `${v.embedding_dim}-d`))),
    h("p", {}, "source job: ", v.source_job_id ? h("a", { href: `#/jobs/${v.source_job_id}` }, v.source_job_id) : "none (imported or shipped)",
      hasCard ? [" · ", h("a", { href: `/models/${encodeURIComponent(name)}/versions/${v.version}/card`, target: "_blank" }, "model card")] : ""),
    h("h2", {}, "Input spec"), keyValues(v.input_spec),
    h("h2", {}, "Serving"), v.serving ? keyValues(v.serving) : h("p", {}, "–"),
    h("h2", {}, "Variants and their checks"),
    h("table", { id: "variants" },
      h("thead", {}, h("tr", {}, ["variant", "status", "cosine min", "max |diff|", "probabilities |diff|", "threshold", "bytes", "checked on", "reason"].map((c) => h("th", {}, c)))),
      h("tbody", {}, Object.entries(v.variants).map(([variant, c]) => h("tr", {},
        h("td", {}, variant), h("td", {}, c.status), h("td", { class: "num" }, fmt(c.cosine_min, 6)), h("td", { class: "num" }, fmt(c.max_abs_diff, 3)),
        h("td", { class: "num" }, fmt(c.probabilities_max_abs_diff, 3)), h("td", { class: "num" }, fmt(c.threshold)), h("td", { class: "num" }, fmt(c.bytes)),
        h("td", {}, c.checked_on || "–"), h("td", {}, c.reason || c.error || ""))))),
    v.head ? [h("h2", {}, "Diagnosis head"), keyValues(v.head)] : "",
    v.knn_reference ? [h("h2", {}, "kNN reference set"), keyValues(v.knn_reference)] : "",
    h("h2", {}, "Metrics"), keyValues(v.metrics),
    h("p", { class: "muted" }, `sha256 ${v.sha256} · created ${when(v.created_at)}`),
  );
}

/** Each version's evaluation results from the finished jobs, newest first wins: `head` (a fine-tuning job's
 * test scores, an evaluation's linear probe) and `knn`, each with macro and per-class AUROC. */
function jobResults(jobs) {
  const out = {};
  for (const job of jobs) {
    if (job.status !== "succeeded" || !job.result) continue;
    const ref = job.kind === "finetune" ? job.model_version : job.kind === "evaluate" ? job.result.model_version : null;
    if (!ref) continue;
    out[ref] ??= {};
    for (const [protocol, entry] of Object.entries(job.result)) {
      if (!entry || typeof entry !== "object" || !entry.auroc_per_class) continue;
      out[ref][protocol === "knn" ? "knn" : "head"] ??= entry;
    }
  }
  return out;
}

export async function comparePage(view) {
  view.append(h("h1", {}, "Compare versions"), h("p", { class: "help" }, "Test-split figures of every version; click a column to sort. Per-class AUROC (and the figures of versions without their own) come from the jobs that made or evaluated a version: the head or linear probe, else kNN."));
  const loaded = await load(view, "/models", "/jobs?limit=500");
  if (!loaded) return;
  const [{ models }, { jobs }] = loaded;
  const versions = models.flatMap((m) => m.versions);
  const results = jobResults(jobs);
  const perClass = (v) => {
    const r = results[v.ref] || {};
    return (r.head || r.knn)?.auroc_per_class || {};
  };
  const classNames = [...new Set(versions.flatMap((v) => v.head?.class_names || v.knn_reference?.class_names || Object.keys(perClass(v))))];
  const rows = versions.map((v) => {
    const f = figures(v);
    const r = results[v.ref] || {};
    const own = perClass(v);
    return {
      ref: v.ref, name: v.name, version: v.version, method: v.method,
      dataset: v.head?.dataset || v.knn_reference?.dataset || v.metrics?.dataset || (v.metrics?.datasets || []).map((d) => d.name).join(", "),
      auroc: f.auroc ?? r.head?.macro_auroc ?? null,
      f1: f.f1 ?? r.head?.macro_f1 ?? null,
      knn: f.knn ?? r.knn?.macro_auroc ?? null,
      ...Object.fromEntries(classNames.map((c) => [`class:${c}`, own[c] ?? null])),
    };
  });
  const columns = [["ref", "version"], ["method", "method"], ["dataset", "dataset"], ["auroc", "macro AUROC"], ["f1", "macro F1"], ["knn", "kNN macro AUROC"], ...classNames.map((c) => [`class:${c}`, `AUROC ${c}`])];
  let sortKey = "auroc";
  let descending = true;
  const body = h("tbody");
  const head = h("tr", {}, columns.map(([key, label]) => {
    const th = h("th", { class: "sortable", "data-key": key }, label);
    th.addEventListener("click", () => {
      descending = sortKey === key ? !descending : true;
      sortKey = key;
      draw();
    });
    return th;
  }));
  function draw() {
    const sorted = [...rows].sort((a, b) => {
      const [x, y] = [a[sortKey], b[sortKey]];
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      const order = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
      return descending ? -order : order;
    });
    head.querySelectorAll("th").forEach((th) => th.classList.remove("sorted-asc", "sorted-desc"));
    head.querySelector(`th[data-key="${sortKey}"]`).classList.add(descending ? "sorted-desc" : "sorted-asc");
    body.replaceChildren(...sorted.map((row) => h("tr", { "data-ref": row.ref }, columns.map(([key]) =>
      key === "ref" ? h("td", {}, h("a", { href: versionHref(row.name, row.version) }, row.ref))
        : h("td", { class: typeof row[key] === "number" || row[key] === null ? "num" : "" }, typeof row[key] === "number" ? row[key].toFixed(3) : fmt(row[key]))))));
  }
  view.append(h("table", { id: "compare" }, h("thead", {}, head), body));
  draw();
}
