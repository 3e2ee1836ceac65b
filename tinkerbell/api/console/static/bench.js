// Benchmarks: the reports `tinkerbell bench` wrote under <data-dir>/bench (JSON/CSV as tables, text, plots).
import { api, el, errorBox, fmtBytes, fmtNum, fmtTime, headers, setTitle, table } from "./core.js";

function objectsTable(rows, caption) {
  const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  return table(cols.map((c) => [c, (r) => (typeof r[c] === "object" && r[c] !== null ? JSON.stringify(r[c]) : fmtNum(r[c]))]), rows, { caption });
}

function renderJson(data) {
  const isRows = (v) => Array.isArray(v) && v.length && v.every((x) => x && typeof x === "object" && !Array.isArray(x));
  if (isRows(data)) return objectsTable(data);
  if (data && typeof data === "object") {
    const parts = [], scalars = {};
    for (const [k, v] of Object.entries(data)) {
      if (isRows(v)) parts.push(objectsTable(v, k));
      else if (v && typeof v === "object") parts.push(el("details", {}, el("summary", { text: k }), el("pre", { text: JSON.stringify(v, null, 2) })));
      else scalars[k] = v;
    }
    if (Object.keys(scalars).length) parts.unshift(objectsTable([scalars]));
    return el("div", {}, parts);
  }
  return el("pre", { text: JSON.stringify(data, null, 2) });
}

function renderCsv(text) {
  const lines = text.trim().split(/\r?\n/).map((l) => l.split(","));
  const [head, ...rows] = lines;
  return table(head.map((h, i) => [h, (r) => r[i]]), rows);
}

async function show(f, box) {
  const r = await fetch(`/console/api/bench/file/${f.name.split("/").map(encodeURIComponent).join("/")}`, { headers: headers(), cache: "no-store" });
  if (!r.ok) throw new Error(`${r.status}`);
  if (f.type === "png" || f.type === "svg") {
    // An <img> cannot send the key header: load the bytes, show them from a blob (an <img> never runs SVG script).
    box.replaceChildren(el("img", { src: URL.createObjectURL(await r.blob()), alt: `plot ${f.name}`, class: "plotimg" }));
  } else if (f.type === "json") box.replaceChildren(renderJson(await r.json()));
  else if (f.type === "csv") box.replaceChildren(renderCsv(await r.text()));
  else box.replaceChildren(el("pre", { text: await r.text() }));
}

export async function render(main) {
  setTitle(main, "Benchmarks");
  const d = await api("/bench");
  if (!d.files.length) {
    main.append(el("div", { class: "empty", id: "bench-empty" },
      el("p", { text: "No benchmark reports yet." }),
      el("p", {}, "Run ", el("code", { text: "tinkerbell bench" }), " against this server; its reports land in ",
        el("code", { text: d.dir }), " and show up here.")));
    return;
  }
  for (const f of d.files) {
    const box = el("div", { class: "report" }, el("p", { class: "muted", text: "Loading…" }));
    const det = el("details", { open: d.files.length <= 6 },
      el("summary", {}, el("strong", { text: f.name }), ` · ${fmtBytes(f.size_bytes)} · ${fmtTime(f.modified)}`), box);
    let loaded = false;
    const load = () => { if (det.open && !loaded) { loaded = true; show(f, box).catch((e) => box.replaceChildren(errorBox(e))); } };
    det.addEventListener("toggle", load);
    main.append(det);
    load();
  }
}
