// Playground: chat with the base model, a checkpoint, a registered adapter or a sampler of this tenant, through
// the OpenAI face (POST /v1/chat/completions, stream: true); the reply streams in as SSE chunks.
import { api, el, errorBox, headers, setTitle } from "./core.js";

function field(label, input, hint) {
  return el("label", { class: "field" }, el("span", { text: label }), input, hint ? el("small", { text: hint }) : null);
}

// Parse "data: {...}\n\n" frames from a fetch body (EventSource cannot send the key header, so no EventSource).
async function* events(response) {
  const reader = response.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

export async function render(main) {
  setTitle(main, "Playground");
  const { models } = await api("/playground/models");
  // Diffusion LMs: the served generation algorithms (an autoregressive model lists none).
  const algos = await (await fetch("/generation/algorithms", { headers: headers(), cache: "no-store" })).json()
    .catch(() => ({ algorithms: [] }));
  const model = el("select", { id: "pg-model" }, models.map((m) => el("option", { value: m.id, text: m.label })));
  const num = (id, value, attrs) => el("input", { id, type: "number", value, ...attrs });
  const maxTokens = num("pg-max-tokens", 128, { min: 1, max: 1024, step: 1 });
  const temperature = num("pg-temperature", 0.7, { min: 0, max: 5, step: 0.05 });
  const topP = num("pg-top-p", 1, { min: 0.01, max: 1, step: 0.01 });
  const topK = num("pg-top-k", -1, { min: -1, step: 1 });
  const seed = el("input", { id: "pg-seed", type: "number", placeholder: "random", step: 1 });
  const names = (algos.algorithms || []).map((a) => (typeof a === "string" ? a : a.name)).filter(Boolean);
  const algorithm = names.length
    ? el("select", { id: "pg-algorithm" }, names.map((n) => el("option", { value: n, text: n, selected: n === algos.default })))
    : null;
  const system = el("textarea", { id: "pg-system", rows: 2, placeholder: "Optional system prompt" });
  const prompt = el("textarea", { id: "pg-prompt", rows: 3, required: true, placeholder: "Say something… (Ctrl+Enter sends)" });
  const send = el("button", { type: "submit", id: "pg-send", text: "Send" });
  const stopBtn = el("button", { type: "button", class: "secondary", id: "pg-stop", text: "Stop", disabled: true });
  const clear = el("button", { type: "button", class: "secondary", text: "New chat" });
  const log = el("div", { class: "chat", id: "pg-log", "aria-live": "polite" });
  const status = el("p", { class: "status", role: "status", id: "pg-status" });
  const history = [];
  let abort = null;

  const form = el("form", { class: "playground" },
    el("div", { class: "params" },
      field("Model", model),
      field("Max tokens", maxTokens), field("Temperature", temperature, "0 = greedy"),
      field("Top-p", topP), field("Top-k", topK, "-1 = off"), field("Seed", seed),
      algorithm ? field("Diffusion algorithm", algorithm) : null),
    field("System", system), log, field("Message", prompt),
    el("div", { class: "row" }, send, stopBtn, clear), status);
  main.append(form);

  const bubble = (role, text) => {
    const b = el("div", { class: `msg ${role}` }, el("span", { class: "role", text: role }), el("div", { class: "text", text }));
    log.append(b);
    b.scrollIntoView({ block: "nearest" });
    return b.querySelector(".text");
  };
  clear.onclick = () => { history.length = 0; log.replaceChildren(); status.textContent = ""; prompt.focus(); };
  stopBtn.onclick = () => abort && abort.abort();
  prompt.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit(); });

  form.onsubmit = async (ev) => {
    ev.preventDefault();
    const text = prompt.value.trim();
    if (!text || abort) return;
    history.push({ role: "user", content: text });
    bubble("user", text);
    prompt.value = "";
    const out = bubble("assistant", "");
    out.parentElement.classList.add("streaming");
    const messages = [...(system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []), ...history];
    const body = { model: model.value, messages, stream: true, max_tokens: Number(maxTokens.value),
      temperature: Number(temperature.value), top_p: Number(topP.value), top_k: Number(topK.value),
      seed: seed.value === "" ? null : Number(seed.value), stream_options: { include_usage: true } };
    if (algorithm) body.generation_algorithm = algorithm.value;
    abort = new AbortController();
    send.disabled = true; stopBtn.disabled = false;
    status.textContent = "Generating…";
    let reply = "";
    try {
      const r = await fetch("/v1/chat/completions", { method: "POST", signal: abort.signal, cache: "no-store",
        headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
      if (!r.ok) {
        let d = r.statusText; try { const j = await r.json(); d = (j.error && j.error.message) || j.detail || d; } catch { /* not JSON */ }
        throw new Error(`${r.status}: ${d}`);
      }
      let finish = null, tokens = null;
      for await (const e of events(r)) {
        if (e.error) throw new Error(e.error.message || String(e.error));
        for (const c of e.choices || []) {
          if (c.delta && c.delta.content) {
            reply += c.delta.content;
            out.textContent = reply;
            out.parentElement.dataset.chunks = String(Number(out.parentElement.dataset.chunks || 0) + 1);
          }
          if (c.finish_reason) finish = c.finish_reason;
        }
        if (e.usage) tokens = e.usage.completion_tokens;
      }
      status.textContent = `${tokens ?? "?"} tokens (${finish === "length" ? "hit max tokens" : "finished"}).`;
    } catch (e) {
      if (e.name === "AbortError") status.textContent = "Stopped.";
      else status.replaceChildren(errorBox(e));
    } finally {
      history.push({ role: "assistant", content: reply });
      out.parentElement.classList.remove("streaming");
      out.parentElement.dataset.done = "1";
      abort = null; send.disabled = false; stopBtn.disabled = true;
      prompt.focus();
    }
  };
}
