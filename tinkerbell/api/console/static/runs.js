// Runs: the tenant's training runs, and one run's metric curves, learning rates and checkpoints.
import { api, el, errorBox, fmtNum, fmtTime, poll, setTitle, table } from "./core.js";
import { lineChart } from "./chart.js";
import { checkpointTable } from "./checkpoints.js";

const runLink = (id) => el("a", { href: `/console/runs/${encodeURIComponent(id)}`, text: id });
const stateBadge = (s) => el("span", { class: `badge s-${s.replace(/ /g, "-")}`, text: s });

export async function renderRuns(main) {
  setTitle(main, "Training runs");
  const box = el("div", { "aria-live": "polite" });
  main.append(box);
  poll(async () => {
    let data;
    try { data = await api("/runs?limit=100"); } catch (e) { box.replaceChildren(errorBox(e)); return; }
    box.replaceChildren(
      el("p", { class: "muted", text: `${data.total} run${data.total === 1 ? "" : "s"}` }),
      table([
        ["Run", (r) => runLink(r.model_id)],
        ["State", (r) => stateBadge(r.state)],
        ["Base model", (r) => r.base_model],
        ["Rank", (r) => r.lora_rank],
        ["Steps", (r) => r.steps],
        ["Last loss", (r) => fmtNum(r.last_loss)],
        ["Last activity", (r) => fmtTime(r.last_activity)],
      ], data.runs, { empty: "No training runs yet. Create one with the tinker SDK (create_lora_training_client)." }),
    );
  }, 5000);
}

// history rows -> {metricName: [[step, value], ...]} for one kind; the step is the call's ordinal within its kind
// (forward_backward and optim_step alternate in a training loop, so both count optimizer steps).
function curves(history, kind) {
  const out = {};
  let i = 0;
  for (const h of history) {
    if (h.kind !== kind) continue;
    i += 1;
    for (const [k, v] of Object.entries(h.metrics)) (out[k] ||= []).push([i, v]);
  }
  return out;
}

// Loss-like metrics first: they are what a reader looks for.
const order = (a, b) => (b.startsWith("loss") - a.startsWith("loss")) || a.localeCompare(b);

export async function renderRun(main, runId) {
  setTitle(main, "Run", " ", el("code", { class: "id", text: runId }));
  const summary = el("div"), charts = el("div", { class: "charts", "aria-live": "polite" }), ckpts = el("div");
  main.append(summary,
    el("h2", { text: "Metrics" }), charts,
    el("h2", { text: "Checkpoints" }), ckpts);
  let lastCount = -1, lastCk = null;
  const stop = poll(async () => {
    let d;
    try { d = await api(`/runs/${encodeURIComponent(runId)}`); } catch (e) {
      summary.replaceChildren(errorBox(e)); charts.replaceChildren(); stop(); return;
    }
    const r = d.run;
    summary.replaceChildren(el("dl", { class: "facts" },
      ...[["State", stateBadge(r.state)], ["Base model", r.base_model], ["LoRA rank", r.lora_rank],
        ["Trains", ["attn", "mlp", "unembed"].filter((k) => r[`train_${k}`]).join(", ")],
        ["Optimizer steps", r.steps], ["forward_backward calls", r.forward_backward_calls],
        ["Last loss", fmtNum(r.last_loss)], ["Created", fmtTime(r.created)],
        ["Last activity", fmtTime(r.last_activity)], ["Session", r.session_id || "–"]]
        .flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v instanceof Node ? v : String(v))])));
    if (d.history.length !== lastCount) {
      lastCount = d.history.length;
      const fb = curves(d.history, "forward_backward"), opt = curves(d.history, "optim_step");
      const figs = [
        ...Object.keys(fb).sort(order).map((k) => lineChart(k, [{ name: k, points: fb[k] }])),
        ...Object.keys(opt).sort(order).map((k) => lineChart(k === "learning_rate" ? "learning rate" : `optim_step ${k}`,
          [{ name: k, points: opt[k] }])),
      ];
      const fwd = curves(d.history, "forward");
      for (const k of Object.keys(fwd).sort(order)) figs.push(lineChart(`forward-only ${k}`, [{ name: k, points: fwd[k] }], { xLabel: "call" }));
      charts.replaceChildren(...(figs.length ? figs : [el("p", { class: "empty", text: "No metrics yet: they appear with the first forward_backward." })]));
    }
    // Re-render only on change, so a TTL being typed or a dialog being answered is not swept away by a poll.
    const ck = JSON.stringify(d.checkpoints);
    if (ck !== lastCk) {
      lastCk = ck;
      ckpts.replaceChildren(checkpointTable(d.checkpoints, () => { lastCk = null; }));
    }
  }, 2000);
}
