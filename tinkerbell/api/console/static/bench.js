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

const fetchFile = async (name) => {
  const r = await fetch(`/console/api/bench/file/${name.split("/").map(encodeURIComponent).join("/")}`, { headers: headers(), cache: "no-store" });
  if (!r.ok) throw new Error(`${name}: ${r.status}`);
  return r;
};

// An <img> cannot send the key header: load the bytes and show them from a blob (an <img> never runs SVG script).
function image(name, alt) {
  const img = el("img", { alt: alt || `plot ${name}`, class: "plotimg" });
  fetchFile(name).then((r) => r.blob()).then((b) => { img.src = URL.createObjectURL(b); }).catch(() => { img.alt += " (missing)"; });
  return img;
}

// The Markdown `tinkerbell bench` writes: headings, pipe tables, images, code fences and paragraphs. Text goes in
// through textContent only, so a report cannot inject markup.
function renderMarkdown(text, dir) {
  const out = [];
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line.startsWith("```")) {
      const code = [];
      while (++i < lines.length && !lines[i].startsWith("```")) code.push(lines[i]);
      out.push(el("pre", { text: code.join("\n") }));
    } else if (/^#{1,6} /.test(line)) {
      out.push(el(line.startsWith("# ") ? "h2" : "h3", { text: line.replace(/^#+ /, "") }));
    } else if (line.startsWith("|")) {
      const rows = [];
      for (; i < lines.length && lines[i].startsWith("|"); i++) rows.push(lines[i].replace(/^\||\|$/g, "").split("|").map((c) => c.trim()));
      i--;
      const [head, , ...body] = rows;
      out.push(table(head.map((h, k) => [h, (r) => r[k]]), body));
    } else if (/^!\[[^\]]*\]\([^)]+\)/.test(line)) {
      const [, alt, src] = line.match(/^!\[([^\]]*)\]\(([^)]+)\)/);
      if (!/^[a-z]+:/i.test(src)) out.push(image(dir ? `${dir}/${src}` : src, alt));
    } else if (line.trim()) {
      out.push(el("p", { text: line.replace(/\*\*|`/g, "") }));
    }
  }
  return el("div", { class: "md" }, out);
}

async function show(f, box) {
  const dir = f.name.includes("/") ? f.name.slice(0, f.name.lastIndexOf("/")) : "";
  if (f.type === "png" || f.type === "svg") { box.replaceChildren(image(f.name)); return; }
  const r = await fetchFile(f.name);
  if (f.type === "json") box.replaceChildren(renderJson(await r.json()));
  else if (f.type === "csv") box.replaceChildren(renderCsv(await r.text()));
  else if (f.type === "md") box.replaceChildren(renderMarkdown(await r.text(), dir));
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
  const reports = new Set(d.files.filter((f) => f.name.endsWith("report.md")).map((f) => f.name.slice(0, -"report.md".length)));
  const inReport = (f) => !f.name.endsWith("report.md") && [...reports].some((p) => p && f.name.startsWith(p));
  const files = [...d.files.filter((f) => !inReport(f)), ...d.files.filter(inReport)];
  let opened = 0;
  for (const f of files) {
    const box = el("div", { class: "report" }, el("p", { class: "muted", text: "Loading…" }));
    const det = el("details", { open: !inReport(f) && opened++ < 4 },
      el("summary", {}, el("strong", { text: f.name }), ` · ${fmtBytes(f.size_bytes)} · ${fmtTime(f.modified)}`), box);
    let loaded = false;
    const load = () => { if (det.open && !loaded) { loaded = true; show(f, box).catch((e) => box.replaceChildren(errorBox(e))); } };
    det.addEventListener("toggle", load);
    main.append(det);
    load();
  }
}
