// Submit forms for pretraining, fine-tuning and evaluation, built from the OpenAPI document's request schemas
// (defaults, descriptions, enums); the API validates, and its 4xx messages are shown next to the field.

import { ApiError, api, h, openapiDocument } from "./api.js";

const PATHS = { pretrain: "/jobs/pretrain", finetune: "/jobs/finetune", evaluate: "/jobs/evaluate" };

function resolve(document, schema) {
  while (schema && schema.$ref) schema = document.components.schemas[schema.$ref.split("/").pop()];
  return schema || {};
}

/** The field's kind of input: its non-null alternative (anyOf / oneOf), resolved. */
function describe(document, property) {
  const alternatives = (property.anyOf || property.oneOf || [property]).map((a) => resolve(document, a));
  const kinds = alternatives.filter((a) => a.type !== "null");
  const nullable = kinds.length < alternatives.length;
  if (kinds.length === 1 && kinds[0].enum) return { input: "enum", options: kinds[0].enum, nullable };
  if (kinds.length === 1 && kinds[0].type === "boolean") return { input: "boolean", nullable };
  if (kinds.length === 1 && ["integer", "number"].includes(kinds[0].type)) return { input: kinds[0].type, nullable, rule: kinds[0] };
  if (kinds.length === 1 && kinds[0].type === "string") return { input: "string", nullable };
  if (kinds.length === 1 && kinds[0].type === "array" && resolve(document, kinds[0].items).enum) {
    return { input: "choices", options: resolve(document, kinds[0].items).enum, nullable };
  }
  if (kinds.some((k) => k.type === "string")) return { input: "string-or-json", nullable };
  return { input: "json", nullable };
}

function control(name, field, property) {
  const value = property.default;
  const example = (property.examples || [])[0];
  const placeholder = example !== undefined ? `e.g. ${typeof example === "string" ? example : JSON.stringify(example)}` : field.nullable ? "(default)" : "";
  const id = `field-${name}`;
  switch (field.input) {
    case "enum":
      return h("select", { id, name },
        field.nullable || value === undefined ? h("option", { value: "" }, "(default)") : null,
        field.options.map((o) => h("option", { value: o, selected: o === value }, o)));
    case "boolean":
      return h("select", { id, name },
        field.nullable || value === undefined ? h("option", { value: "" }, "(default)") : null,
        ["true", "false"].map((o) => h("option", { value: o, selected: String(value) === o }, o)));
    case "integer":
    case "number":
      return h("input", { id, name, type: "number", step: field.input === "integer" ? "1" : "any", value: value ?? "", placeholder });
    case "choices":
      return h("span", { id, "data-choices": name }, field.options.map((o) => h("label", {},
        h("input", { type: "checkbox", name, value: o, checked: Array.isArray(value) && value.includes(o) }), ` ${o} `)));
    case "json":
      return h("textarea", { id, name, rows: 2, placeholder: placeholder || "JSON" }, value !== undefined && value !== null ? JSON.stringify(value) : "");
    default:
      return h("input", { id, name, type: "text", value: value ?? "", placeholder });
  }
}

/** The form's value of one field, or undefined to leave it out (the API's default then applies). */
function read(element, field) {
  if (field.input === "choices") {
    const checked = [...element].filter((box) => box.checked).map((box) => box.value);
    return checked.length ? checked : undefined;
  }
  const raw = element.value.trim();
  if (raw === "") return undefined;
  switch (field.input) {
    case "boolean":
      return raw === "true";
    case "integer":
    case "number":
      return Number(raw);
    case "json":
      return JSON.parse(raw);
    case "string-or-json":
      return raw.startsWith("[") || raw.startsWith("{") ? JSON.parse(raw) : raw;
    default:
      return raw;
  }
}

/** The field a string message is about: the first field whose name it mentions, else none. */
function fieldOf(message, names) {
  const text = String(message).toLowerCase();
  return names.find((name) => new RegExp(`\\b${name}\\b`).test(text)) || names.find((name) => text.includes(name.replace(/_/g, " ")));
}

export async function submitPage(view, kind) {
  const document = await openapiDocument();
  const operation = document.paths[PATHS[kind]].post;
  const schema = resolve(document, operation.requestBody.content["application/json"].schema);
  const required = new Set(schema.required || []);
  const fields = {};
  const form = h("form", { class: "job-form", id: `${kind}-form`, novalidate: true });
  const formError = h("div", { class: "error", id: "form-error", role: "alert" });
  for (const [name, property] of Object.entries(schema.properties)) {
    const field = describe(document, property);
    fields[name] = field;
    const resolved = resolve(document, property);
    const description = property.description || resolved.description || "";
    form.append(
      h("label", { for: `field-${name}` }, name, required.has(name) ? " *" : ""),
      h("div", { class: "field-input" }, control(name, field, property),
        h("div", { class: "help" }, description),
        h("div", { class: "field-error", "data-field": name })),
    );
  }
  const submit = h("button", { type: "submit" }, `Queue ${kind} job`);
  form.append(h("span"), h("div", {}, submit));
  view.append(
    h("div", { class: "tabs" }, Object.keys(PATHS).map((k) => h("a", { href: `#/submit/${k}`, class: k === kind ? "active" : null }, k))),
    h("h1", {}, operation.summary),
    h("p", { class: "help" }, schema.description || ""),
    formError,
    form,
  );

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    formError.replaceChildren();
    form.querySelectorAll(".field-error").forEach((e) => e.replaceChildren());
    const body = {};
    for (const [name, field] of Object.entries(fields)) {
      try {
        const value = read(field.input === "choices" ? form.querySelectorAll(`input[name="${name}"]`) : form.elements[name], field);
        if (value !== undefined) body[name] = value;
      } catch {
        form.querySelector(`.field-error[data-field="${name}"]`).textContent = "not valid JSON";
        return;
      }
    }
    submit.disabled = true;
    try {
      const created = await api(PATHS[kind], { method: "POST", json: body });
      location.hash = `#/jobs/${created.job_id}`;
    } catch (error) {
      showErrors(error);
    } finally {
      submit.disabled = false;
    }
  });

  function showErrors(error) {
    const names = Object.keys(fields);
    const issues = error instanceof ApiError && Array.isArray(error.detail) ? error.detail : [{ msg: error.message }];
    for (const issue of issues) {
      const loc = issue.loc || [];
      const name = loc[0] === "body" && names.includes(String(loc[1])) ? String(loc[1]) : fieldOf(issue.msg, names);
      const text = `${error.status ?? ""} ${issue.msg}${loc.length > 2 ? ` (at ${loc.slice(1).join(".")})` : ""}`.trim();
      const target = name && form.querySelector(`.field-error[data-field="${name}"]`);
      if (target) target.append(h("div", {}, text));
      else formError.append(h("div", {}, text));
    }
  }
}
