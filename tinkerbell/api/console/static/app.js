// Boot: find out whether the server needs a key, show sign-in if so, then render the page's view.
import { api, apiKey, el, errorBox, session, setKey, signOut } from "./core.js";

const VIEWS = {
  runs: ["./runs.js", "renderRuns"], run: ["./runs.js", "renderRun"],
  checkpoints: ["./checkpoints.js", "render"], playground: ["./playground.js", "render"],
  live: ["./live.js", "render"], bench: ["./bench.js", "render"],
};

function markNav(view) {
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav.split(" ").includes(view)) a.setAttribute("aria-current", "page");
  }
}

function showSignIn(message) {
  document.getElementById("main").hidden = true;
  const box = document.getElementById("signin");
  box.hidden = false;
  document.getElementById("signin-error").textContent = message || "";
  const input = document.getElementById("key");
  input.focus();
  document.getElementById("signin-form").onsubmit = async (ev) => {
    ev.preventDefault();
    setKey(input.value.trim());
    try {
      await api("/whoami");
      location.reload();
    } catch (e) {
      sessionStorage.clear();
      document.getElementById("signin-error").textContent =
        e.status === 401 ? "That key is not known to this server." : String(e.message);
    }
  };
}

async function boot() {
  const body = document.body;
  const view = body.dataset.view;
  markNav(view);
  const cfg = await (await fetch("/console/api/config", { cache: "no-store" })).json();
  session.noAuth = cfg.no_auth;
  if (!cfg.no_auth && !apiKey()) return showSignIn();
  let me;
  try {
    me = await api("/whoami");
  } catch (e) {
    if (e.status === 401) { sessionStorage.clear(); return showSignIn("Your key was not accepted; sign in again."); }
    throw e;
  }
  Object.assign(session, { tenant: me.tenant, model: me.model });
  const who = document.getElementById("who");
  who.append(el("span", { text: cfg.no_auth ? "no sign-in (--no-auth)" : `tenant ${me.tenant}` }));
  if (!cfg.no_auth) who.append(" ", el("button", { class: "link", type: "button", onclick: signOut, text: "Sign out" }));
  const main = document.getElementById("main");
  document.getElementById("loading").remove();
  const [path, fn] = VIEWS[view];
  const mod = await import(path);
  try {
    await mod[fn](main, body.dataset.arg);
  } catch (e) {
    main.append(errorBox(e));
  }
}

boot().catch((e) => { document.getElementById("main").append(errorBox(e)); });
