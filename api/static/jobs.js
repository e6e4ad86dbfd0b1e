// Jobs: the list (filtered by status and kind) and a job's page with live progress, curves and artifacts.

import { api, duration, errorBox, fmt, h, when } from "./api.js";
import { lineChart } from "./charts.js";

const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled"];
const KINDS = ["", "pretrain", "finetune", "evaluate", "embed_dataset"];
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

function jobModel(job) {
  const p = job.params || {};
  if (job.model_version) return job.model_version;
  if (p.model) return p.model;
  if (p.model_name) return p.model_name;
  return p.method && p.model_size ? `${p.method}-${p.model_size}` : "–";
}

function jobDuration(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? new Date(job.finished_at) : new Date();
  return (end - new Date(job.started_at)) / 1000;
}

function select(name, options, value) {
  return h("select", { name, "aria-label": name }, options.map((o) => h("option", { value: o, selected: o === value }, o || `any ${name}`)));
}

export async function jobsPage(view) {
  const params = new URLSearchParams(sessionStorage.getItem("jobs.filters") || "");
  const status = select("status", STATUSES, params.get("status") || "");
  const kind = select("kind", KINDS, params.get("kind") || "");
  const body = h("tbody");
  const message = h("div");
  view.append(
    h("h1", {}, "Jobs"),
    h("div", { class: "filters" }, status, kind, h("a", { href: "#/submit/pretrain" }, "Submit a job")),
    message,
    h("table", { id: "jobs" },
      h("thead", {}, h("tr", {}, ["status", "kind", "model", "dataset", "started", "duration", "progress"].map((c) => h("th", {}, c)))),
      body),
  );
  async function refresh() {
    const query = new URLSearchParams({ limit: "500" });
    if (status.value) query.set("status", status.value);
    if (kind.value) query.set("kind", kind.value);
    sessionStorage.setItem("jobs.filters", new URLSearchParams({ status: status.value, kind: kind.value }).toString());
    try {
      const { jobs } = await api(`/jobs?${query}`);
      const shown = jobs;
      message.replaceChildren(shown.length ? "" : h("p", { class: "muted" }, "No jobs match."));
      body.replaceChildren(...shown.map((job) => h("tr", { "data-job": job.id },
        h("td", { class: `status status-${job.status}` }, h("a", { href: `#/jobs/${job.id}` }, job.status)),
        h("td", {}, job.kind),
        h("td", {}, jobModel(job)),
        h("td", {}, job.dataset || "–"),
        h("td", {}, when(job.started_at)),
        h("td", { class: "num" }, duration(jobDuration(job))),
        h("td", {}, job.progress.epochs ? `epoch ${job.progress.epoch}/${job.progress.epochs}` : job.progress.phase || ""),
      )));
    } catch (error) {
      message.replaceChildren(errorBox(error));
    }
  }
  status.addEventListener("change", refresh);
  kind.addEventListener("change", refresh);
  await refresh();
  const timer = setInterval(refresh, 3000);
  return () => clearInterval(timer);
}

function card(label, value, name) {
  return h("div", { class: "card", "data-field": name }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
}

/** Per-epoch curves: all losses in one chart, each other metric in its own. */
export function metricCharts(metrics) {
  const names = [...new Set(metrics.flatMap((m) => Object.keys(m.values)))];
  const series = (name) => ({ name, points: metrics.filter((m) => name in m.values).map((m) => [m.epoch, m.values[name]]) });
  const losses = names.filter((n) => n.endsWith("loss"));
  const charts = [];
  if (losses.length) charts.push(lineChart({ title: "loss", series: losses.map(series), yLabel: "loss" }));
  for (const name of names.filter((n) => !n.endsWith("loss"))) charts.push(lineChart({ title: name, series: [series(name)], yLabel: name }));
  return charts;
}

export async function jobPage(view, id) {
  const title = h("h1", {}, `Job ${id}`);
  const summary = h("div");
  const progress = h("div");
  const charts = h("div", { class: "charts", id: "curves" });
  const error = h("div");
  const artifacts = h("div", { class: "artifacts" });
  const result = h("div");
  const message = h("div");
  const cancel = h("button", { id: "cancel", type: "button" }, "Cancel job");
  view.append(title, message, summary, progress, h("h2", {}, "Metrics per epoch"), charts, error, h("h2", {}, "Artifacts"), artifacts, result);
  let shownArtifacts = "";
  let finished = false;
  let timer = null;
  let stopped = false;

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      await api(`/jobs/${id}/cancel`, { method: "POST" });
      await refresh();
    } catch (e) {
      message.replaceChildren(errorBox(e));
      cancel.disabled = false;
    }
  });

  async function refresh() {
    let job;
    try {
      job = await api(`/jobs/${id}`);
      message.replaceChildren();
    } catch (e) {
      message.replaceChildren(errorBox(e));
      return;
    }
    finished = FINISHED.has(job.status);
    const p = job.progress;
    title.replaceChildren(`${job.kind} job `, h("span", { class: `status status-${job.status}`, id: "job-status" }, job.status));
    summary.replaceChildren(h("table", {}, h("tbody", {},
      [["id", job.id], ["model", jobModel(job)], ["dataset", job.dataset || "–"], ["created", when(job.created_at)],
        ["started", when(job.started_at)], ["finished", when(job.finished_at)], ["duration", duration(jobDuration(job))],
        ["worker", job.worker || "–"]].map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v))),
      job.model_version ? h("tr", {}, h("th", {}, "registered"), h("td", {}, versionLink(job.model_version))) : null,
    )), finished ? "" : h("p", {}, cancel, job.cancel_requested ? h("span", { class: "muted" }, " cancel requested") : null));
    const fraction = p.epochs ? Math.min(1, ((p.epoch - 1 + (p.total_steps ? p.step / p.total_steps : 0)) / p.epochs)) : 0;
    progress.replaceChildren(
      h("div", { class: "grid", id: "progress" },
        card("phase", p.phase || "–", "phase"),
        card("epoch", `${p.epoch} / ${p.epochs}`, "epoch"),
        card("step", `${p.step} / ${p.total_steps}`, "step"),
        card("loss", fmt(p.last_loss), "loss"),
        card("learning rate", fmt(p.learning_rate, 3), "lr"),
        card("samples/s", fmt(p.samples_per_s, 3), "samples_per_s"),
        card("ETA", finished ? "–" : duration(p.eta_s), "eta")),
      h("div", { class: "bar" }, h("div", { style: `width: ${(finished && job.status === "succeeded" ? 1 : Math.max(0, fraction)) * 100}%` })),
    );
    charts.replaceChildren(...(job.metrics.length ? metricCharts(job.metrics) : [h("p", { class: "muted" }, "No finished epoch yet.")]));
    error.replaceChildren(job.error ? h("div", {}, h("h2", {}, "Error"), h("pre", { class: "error", id: "job-error" }, job.error)) : "");
    const names = job.artifacts.join("|");
    if (names !== shownArtifacts) {
      shownArtifacts = names;
      artifacts.replaceChildren(...(job.artifacts.length
        ? job.artifacts.map((name) => h("figure", {}, h("img", { src: `/jobs/${id}/artifacts/${encodeURIComponent(name)}`, alt: name, loading: "lazy" }), h("figcaption", {}, name)))
        : [h("p", { class: "muted" }, "No PNG artifacts.")]));
    }
    result.replaceChildren(h("h2", {}, "Parameters"), h("pre", {}, JSON.stringify(job.params, null, 2)),
      job.result ? h("div", {}, h("h2", {}, "Result"), h("pre", {}, JSON.stringify(job.result, null, 2))) : "");
  }

  async function loop() {
    await refresh();
    if (!finished && !stopped) timer = setTimeout(loop, 1000);
  }
  await loop();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

export function versionLink(ref) {
  const at = ref.lastIndexOf("@");
  return h("a", { href: `#/models/${encodeURIComponent(ref.slice(0, at))}/versions/${ref.slice(at + 1)}` }, ref);
}
