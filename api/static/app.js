// The dashboard's entry point: a hash router (#/jobs, #/jobs/<id>, #/submit/<kind>, #/models, ...).

import { apiKey, h } from "./api.js";
import { jobPage, jobsPage } from "./jobs.js";
import { comparePage, modelsPage, versionPage } from "./models.js";
import { submitPage } from "./submit.js";
import { tryPage } from "./tryit.js";

const ROUTES = [
  [/^#\/jobs\/([0-9a-f-]{36})$/, jobPage],
  [/^#\/jobs$/, jobsPage],
  [/^#\/submit\/(pretrain|finetune|evaluate)$/, submitPage],
  [/^#\/models\/([^/]+)\/versions\/(\d+)$/, versionPage],
  [/^#\/models$/, modelsPage],
  [/^#\/compare$/, comparePage],
  [/^#\/try$/, tryPage],
];

let leave = null; // the current page's clean-up (stops its polling)

async function render() {
  if (leave) leave();
  leave = null;
  const hash = location.hash || "#/jobs";
  const view = document.getElementById("view");
  view.replaceChildren();
  for (const [pattern, page] of ROUTES) {
    const match = hash.match(pattern);
    if (match) {
      leave = (await page(view, ...match.slice(1).map(decodeURIComponent))) || null;
      return;
    }
  }
  view.append(h("h1", {}, "Not found"), h("p", {}, `No page at ${hash}: `, h("a", { href: "#/jobs" }, "jobs")));
}

const keyInput = document.getElementById("api-key");
keyInput.value = apiKey.get();
keyInput.addEventListener("change", () => apiKey.set(keyInput.value.trim()));
window.addEventListener("hashchange", render);
render();
