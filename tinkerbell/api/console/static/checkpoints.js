// Checkpoints: list, download (zip of the PEFT folder), copy the tinker:// path, publish/unpublish, TTL, delete.
import { api, confirmAction, el, errorBox, fmtBytes, fmtTime, headers, setTitle, table } from "./core.js";

function parts(path) {
  const [run, kind, name] = path.slice("tinker://".length).split("/");
  return `/checkpoints/${encodeURIComponent(run)}/${encodeURIComponent(kind)}/${encodeURIComponent(name)}`;
}

async function download(c, status) {
  // fetch with the key header, then hand the browser a blob: the key never goes into a URL or a cookie.
  status.textContent = "Preparing archive…";
  const r = await fetch("/console/api" + parts(c.tinker_path) + "/archive", { headers: headers(), cache: "no-store" });
  if (!r.ok) { status.textContent = `Download failed (${r.status})`; return; }
  const name = (r.headers.get("content-disposition") || "").match(/filename="?([^";]+)"?/);
  const url = URL.createObjectURL(await r.blob());
  const a = el("a", { href: url, download: name ? name[1] : "checkpoint.zip", hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  status.textContent = "Downloaded.";
}

async function copyPath(path, status) {
  try {
    await navigator.clipboard.writeText(path);
    status.textContent = `Copied ${path}`;
  } catch {
    // No clipboard permission (plain http on another host): select it for a manual copy instead.
    const box = el("input", { value: path, readonly: true, "aria-label": "tinker path", class: "pathbox" });
    status.replaceChildren(box);
    box.select();
  }
}

function ttlControl(c, act) {
  const input = el("input", { type: "number", min: "1", step: "1", placeholder: "hours", class: "ttl",
    "aria-label": `TTL in hours for ${c.tinker_path}` });
  const set = el("button", { type: "button", class: "secondary", text: "Set TTL", onclick: () => {
    const h = Number(input.value);
    if (!(h > 0)) { input.focus(); return; }
    act(`Expire ${c.tinker_path} in ${h} h? It is deleted then.`, "Set TTL",
      { path: parts(c.tinker_path) + "/ttl", body: { ttl_seconds: Math.round(h * 3600) } });
  } });
  const clear = c.expires_at ? el("button", { type: "button", class: "secondary", text: "Keep forever", onclick: () =>
    act(`Remove the expiry of ${c.tinker_path}?`, "Keep forever", { path: parts(c.tinker_path) + "/ttl", body: { ttl_seconds: null } }) }) : null;
  return el("span", { class: "ttlbox" }, input, set, clear);
}

// The shared table (this page and a run's page). onChange is called after any action succeeded.
export function checkpointTable(items, onChange) {
  const status = el("p", { class: "status", role: "status" });
  const act = async (question, label, { path, method = "POST", body }) => {
    if (!(await confirmAction(question, label))) return;
    try {
      await api(path, { method, body });
      status.textContent = "Done.";
      onChange();
    } catch (e) { status.replaceChildren(errorBox(e)); }
  };
  const cols = [
    ["Path", (c) => el("code", { class: "id", text: c.tinker_path })],
    ["Type", (c) => c.checkpoint_type],
    ["Size", (c) => fmtBytes(c.size_bytes)],
    ["Saved", (c) => fmtTime(c.time)],
    ["Expires", (c) => c.expires_at ? fmtTime(c.expires_at) : "never"],
    ["Public", (c) => c.public ? "yes" : "no"],
    ["Actions", (c) => el("div", { class: "actions" },
      el("button", { type: "button", text: "Download", "data-action": "download", onclick: () => download(c, status) }),
      el("button", { type: "button", class: "secondary", text: "Copy path", onclick: () => copyPath(c.tinker_path, status) }),
      el("button", { type: "button", class: "secondary", text: c.public ? "Unpublish" : "Publish", onclick: () =>
        act(c.public ? `Make ${c.tinker_path} private again?` : `Publish ${c.tinker_path}? Every API key of this server can then read it.`,
          c.public ? "Unpublish" : "Publish", { path: parts(c.tinker_path) + "/publish", body: { public: !c.public } }) }),
      ttlControl(c, act),
      el("button", { type: "button", class: "danger", text: "Delete", "data-action": "delete", onclick: () =>
        act(`Delete ${c.tinker_path}? This cannot be undone.`, "Delete", { path: parts(c.tinker_path), method: "DELETE" }) }))],
  ];
  return el("div", {}, table(cols, items, { empty: "No checkpoints saved yet (save_state, save_weights_for_sampler)." }), status);
}

export async function render(main) {
  setTitle(main, "Checkpoints");
  const box = el("div");
  main.append(box);
  const load = async () => {
    try {
      const d = await api("/checkpoints?limit=500");
      box.replaceChildren(el("p", { class: "muted", text: `${d.total} checkpoint${d.total === 1 ? "" : "s"}` }),
        checkpointTable(d.checkpoints, load));
    } catch (e) { box.replaceChildren(errorBox(e)); }
  };
  await load();
}
