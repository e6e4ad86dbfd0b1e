// Try it: upload an ECG, see its leads as read and as the model sees them, its diagnosis probabilities
// against their thresholds, and its nearest reference records.

import { api, errorBox, h, load } from "./api.js";
import { ecgPlot, probabilityChart } from "./charts.js";

export async function tryPage(view) {
  view.append(h("h1", {}, "Try a model on an ECG"));
  const loaded = await load(view, "/models");
  if (!loaded) return;
  const [{ models }] = loaded;
  const versions = {}; // ref -> version
  const options = [];
  for (const model of models) {
    for (const [alias, number] of Object.entries(model.aliases)) {
      const v = model.versions.find((x) => x.version === number);
      versions[`${model.name}@${alias}`] = v;
      options.push(`${model.name}@${alias}`);
    }
    for (const v of model.versions) {
      versions[v.ref] = v;
      options.push(v.ref);
    }
  }
  const preferred = options.find((ref) => versions[ref].head) || options[0];
  const model = h("select", { id: "try-model", name: "model" }, options.map((ref) => h("option", { value: ref, selected: ref === preferred }, ref)));
  const files = h("input", { id: "try-files", type: "file", name: "files", multiple: true });
  const fs = h("input", { id: "try-fs", name: "fs", type: "number", step: "any", placeholder: "only .npy/.npz/.csv/.json without a rate", size: 34 });
  const leads = h("input", { id: "try-leads", name: "leads", placeholder: "e.g. I,II,III,aVR,… (arrays only)", size: 34 });
  const run = h("button", { id: "try-run", type: "submit" }, "Read and predict");
  const out = h("div", { id: "try-result" });
  const form = h("form", { id: "try-form" },
    h("p", {}, h("label", {}, "model ", model)),
    h("p", {}, h("label", {}, "ECG files ", files), h("span", { class: "help" }, " WFDB .hea with its .dat/.mat, or one .zip, .edf, .bdf, .npy, .npz, .csv, .json")),
    h("p", {}, h("label", {}, "fs (Hz) ", fs), " ", h("label", {}, "leads ", leads)),
    h("p", {}, run));
  view.append(models.length ? form : h("p", { class: "muted" }, "No model is registered yet."), out);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!files.files.length) {
      out.replaceChildren(h("p", { class: "error" }, "choose the ECG's files first"));
      return;
    }
    const upload = () => {
      const data = new FormData();
      for (const file of files.files) data.append("files", file, file.name);
      if (fs.value) data.append("fs", fs.value);
      if (leads.value.trim()) data.append("leads", leads.value.trim());
      return data;
    };
    const ref = model.value;
    const version = versions[ref];
    const query = `model=${encodeURIComponent(ref)}`;
    run.disabled = true;
    const predictBox = h("div", { id: "predict" }, h("p", { class: "muted" }, "predicting…"));
    const neighboursBox = h("div", { id: "neighbours" });
    const plots = h("div", { id: "plots" }, h("p", { class: "muted" }, "reading…"));
    out.replaceChildren(h("h2", {}, "Diagnosis"), predictBox, neighboursBox, h("h2", {}, "Leads"), plots);
    const tasks = [
      api(`/ecg/preview?${query}`, { method: "POST", form: upload() }).then((preview) => {
        plots.replaceChildren(
          h("p", {}, `${preview.source}: ${preview.duration_s} s; the first ${preview.seconds} s shown`),
          ecgPlot(preview.read, `As read: ${preview.read.leads.length} leads at ${preview.read.fs} Hz`),
          ecgPlot(preview.preprocessed, `As preprocessed for ${preview.model}: ${preview.preprocessed.leads.length} leads resampled to ${preview.preprocessed.fs} Hz, band-passed`),
        );
      }, (error) => plots.replaceChildren(errorBox(error))),
      api(`/predict?${query}`, { method: "POST", form: upload() }).then((p) => {
        predictBox.replaceChildren(
          h("p", {}, `${p.model}@${p.version} · method ${p.method} · ${p.record.windows} windows · predicted: `, h("strong", { id: "labels" }, p.labels.join(", ") || "none")),
          probabilityChart(p.classes, p.probabilities, p.thresholds, p.labels));
      }, (error) => predictBox.replaceChildren(errorBox(error))),
    ];
    if (version?.knn_reference) {
      tasks.push(api(`/ecg/neighbours?${query}&count=5`, { method: "POST", form: upload() }).then((n) => {
        neighboursBox.replaceChildren(
          h("h2", {}, `Nearest reference records (${n.dataset}, ${n.metric})`),
          h("table", { id: "neighbours-table" },
            h("thead", {}, h("tr", {}, ["record", "labels", "distance"].map((c) => h("th", {}, c)))),
            h("tbody", {}, n.neighbours.map((x) => h("tr", {}, h("td", {}, x.record_id), h("td", {}, x.labels.join(", ") || "none"), h("td", { class: "num" }, x.distance.toFixed(4)))))));
      }, (error) => neighboursBox.replaceChildren(errorBox(error))));
    } else {
      neighboursBox.replaceChildren(h("p", { class: "muted" }, `${ref} has no kNN reference set: no nearest records.`));
    }
    await Promise.all(tasks);
    run.disabled = false;
  });
}
