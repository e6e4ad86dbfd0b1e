// The HTTP API as the dashboard calls it: JSON in and out, the API key as a Bearer token when one is set.

const KEY = "ecgssl.apiKey";

export const apiKey = {
  get: () => localStorage.getItem(KEY) || "",
  set: (value) => (value ? localStorage.setItem(KEY, value) : localStorage.removeItem(KEY)),
};

/** A refused request: its status and the API's `detail` (a message, or a list of schema issues). */
export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
    this.detail = detail;
  }
}

/** Call the API; `json` is sent as a JSON body, `form` as multipart. Resolves to the parsed answer. */
export async function api(path, { method = "GET", json, form } = {}) {
  const headers = {};
  const key = apiKey.get();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  const response = await fetch(path, { method, headers, body });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = text;
  }
  if (!response.ok) throw new ApiError(response.status, data && data.detail !== undefined ? data.detail : data);
  return data;
}

/** What a page shows, read at once (one answer per path); on a refusal its error box is shown in `view` and
 * the answer is null. */
export async function load(view, ...paths) {
  try {
    return await Promise.all(paths.map((path) => api(path)));
  } catch (error) {
    view.append(errorBox(error));
    return null;
  }
}

let openapi = null;

/** The service's OpenAPI document (fetched once). */
export async function openapiDocument() {
  openapi ??= await api("/openapi.json");
  return openapi;
}

/** Create an element: h("td", {class: "num"}, "1.0", child, ...). */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

export function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(digits);
  return String(value);
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

export function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, error instanceof ApiError ? `${error.status}: ${error.message}` : String(error));
}
