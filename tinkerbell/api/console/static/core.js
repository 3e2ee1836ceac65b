// Shared by every view: the API key (session storage only), JSON calls with the key as a header, DOM helpers.
// Everything user-controlled is put in the page with textContent, never innerHTML.

const KEY = "tinkerbell.apiKey";
export const session = { noAuth: false, tenant: null, model: null };

export class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

export function apiKey() { return sessionStorage.getItem(KEY); }
export function setKey(k) { sessionStorage.setItem(KEY, k); }
export function signOut() { sessionStorage.removeItem(KEY); location.reload(); }

export function headers(extra = {}) {
  const h = { ...extra };
  const k = apiKey();
  if (k) h["X-API-Key"] = k;
  return h;
}

// method other than GET: an action, which carries the console's CSRF header (see api/console/__init__.py).
export async function api(path, { method = "GET", body, raw = false, signal } = {}) {
  const h = headers(method === "GET" ? {} : { "X-Tinkerbell-Console": "1" });
  const init = { method, headers: h, cache: "no-store", signal };
  if (body !== undefined) { h["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  const r = await fetch("/console/api" + path, init);
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail || detail; } catch { /* not JSON */ }
    throw new ApiError(r.status, detail);
  }
  return raw ? r : r.json();
}

export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

export function fmtNum(v, digits = 4) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString("en");
  return Math.abs(v) >= 1000 ? v.toFixed(0) : Number(v.toPrecision(digits)).toString();
}

export function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  const s = (Date.now() - d.getTime()) / 1000;
  if (s < 0) return "in " + fmtDuration(-s);
  return fmtDuration(s) + " ago";
}

export function fmtDuration(s) {
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

// A table whose columns are [header, row => cell (string or Node)]; scrolls sideways on a phone.
export function table(columns, rows, { caption, empty = "Nothing here yet." } = {}) {
  if (!rows.length) return el("p", { class: "empty", text: empty });
  const t = el("table", {},
    caption ? el("caption", { text: caption }) : null,
    el("thead", {}, el("tr", {}, columns.map(([h]) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows.map((r) => el("tr", {}, columns.map(([, f]) => {
      const v = f(r);
      return el("td", {}, v instanceof Node ? v : (v === null || v === undefined ? "–" : String(v)));
    })))));
  return el("div", { class: "scroll" }, t);
}

export function errorBox(e) {
  const msg = e instanceof ApiError ? `${e.status}: ${e.message}` : String(e && e.message || e);
  return el("p", { class: "error", role: "alert", text: msg });
}

// A modal confirmation (<dialog>: focus moves in, Esc cancels); resolves true only on the confirm button.
export function confirmAction(message, confirmLabel = "Confirm") {
  return new Promise((resolve) => {
    const d = el("dialog", { class: "confirm", "aria-label": "Confirm" },
      el("p", { text: message }),
      el("form", { method: "dialog", class: "row" },
        el("button", { value: "cancel", class: "secondary", text: "Cancel" }),
        el("button", { value: "ok", class: "danger", "data-confirm": "ok", text: confirmLabel })));
    d.addEventListener("close", () => { resolve(d.returnValue === "ok"); d.remove(); });
    document.body.append(d);
    d.showModal();
  });
}

export function setTitle(main, text, ...extra) {
  main.append(el("h1", { text }, ...extra));
  document.title = `${text} · Tinkerbell console`;
}

// setTimeout-based polling that pauses while the tab is hidden and never overlaps itself.
export function poll(fn, ms) {
  let timer = null;
  const tick = async () => {
    if (!document.hidden) { try { await fn(); } catch (e) { console.warn(e); } }
    timer = setTimeout(tick, ms);
  };
  tick();
  return () => clearTimeout(timer);
}
