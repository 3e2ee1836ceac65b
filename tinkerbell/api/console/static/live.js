// Live: one card per replica (a single server has one), refreshed every second without a reload. Rates come from
// the difference of cumulative counters between two polls.
import { api, el, errorBox, fmtBytes, fmtDuration, fmtNum, poll, setTitle } from "./core.js";
import { lineChart } from "./chart.js";

const HISTORY = 90;

function meter(label, used, total, id) {
  const pct = total ? Math.min(100, (100 * used) / total) : 0;
  return el("div", { class: "meter-row" },
    el("span", { text: label }),
    el("meter", { min: 0, max: total || 1, value: used, id, "aria-label": label }),
    el("span", { class: "num", text: `${fmtNum(used)} / ${fmtNum(total)} (${pct.toFixed(0)}%)` }));
}

function stat(label, value, id) {
  return el("div", { class: "stat" }, el("span", { class: "num", id, text: fmtNum(value) }), el("span", { text: label }));
}

function card(r, rates, idPrefix) {
  const v = r.view;
  if (!v) return el("section", { class: "card down" }, el("h2", { text: `${r.name}: unreachable` }), el("p", { text: r.error || "" }));
  const mem = v.memory || { rows: [] };
  const memTotal = mem.total_bytes || mem.rows.reduce((a, x) => a + x.bytes, 0);
  const slots = v.lora_slots;
  return el("section", { class: "card", "aria-label": r.name },
    el("h2", {}, r.name, " ", el("span", { class: `badge ${r.healthy ? "s-active" : "s-failed"}`, text: r.healthy ? "healthy" : "unhealthy" })),
    el("p", { class: "muted", text: `${v.model} · up ${fmtDuration(v.uptime_seconds || 0)} · ${fmtNum(v.requests)} requests, ${fmtNum(v.errors)} errors` }),
    el("div", { class: "stats" },
      stat("running sequences", v.sequences.running, `${idPrefix}running`),
      stat("waiting sequences", v.sequences.waiting, `${idPrefix}waiting`),
      stat("sampling tokens/s", rates.sample, `${idPrefix}sample-rate`),
      stat("training tokens/s", rates.train, `${idPrefix}train-rate`),
      stat("training queue", v.queues.training_requests, `${idPrefix}train-queue`),
      stat("engine queue", v.queues.engine_jobs),
      stat("sampling in flight", v.queues.sampling_in_flight, `${idPrefix}in-flight`),
      stat("tokens sampled", v.counters.tokens_sampled, `${idPrefix}tokens-sampled`),
      stat("tokens trained", v.counters.tokens_trained, `${idPrefix}tokens-trained`),
      stat("optimizer steps", v.counters.optim_steps),
      stat("runs loaded", v.counters.runs_loaded),
      stat("preemptions", v.counters.preemptions)),
    meter("KV blocks", v.kv_blocks.used, v.kv_blocks.total, `${idPrefix}kv`),
    meter("LoRA slots", slots.resident.length, slots.total),
    el("ul", { class: "slots" }, slots.resident.length
      ? slots.resident.map((s) => el("li", { class: s.yours ? "yours" : "", text: s.label }))
      : [el("li", { class: "muted", text: "no adapter resident" })]),
    el("h3", { text: `Memory (${mem.device || "?"})` }),
    el("div", {}, mem.rows.map((m) => meter(m.use, m.bytes, memTotal)).map((row, i) => {
      row.lastChild.textContent = fmtBytes(mem.rows[i].bytes);
      return row;
    })),
    v.engine_error ? el("p", { class: "error", text: `engine stats: ${v.engine_error}` }) : null);
}

export async function render(main) {
  setTitle(main, "Live");
  const updated = el("p", { class: "muted", id: "live-updated" });
  const cards = el("div", { class: "cards" });
  const trend = el("div", { class: "charts" });
  main.append(updated, cards, el("h2", { text: "Throughput, last minutes" }), trend);
  const prev = {};
  const hist = { sample: [], train: [] };
  let t0 = null;
  poll(async () => {
    let d;
    try { d = await api("/live"); } catch (e) { cards.replaceChildren(errorBox(e)); return; }
    t0 ??= d.time;
    let sampleSum = 0, trainSum = 0;
    const nodes = d.replicas.map((r, i) => {
      const c = r.view ? r.view.counters : null;
      const p = prev[r.name];
      const dt = p ? d.time - p.time : 0;
      const rates = { sample: 0, train: 0 };
      if (c && p && dt > 0) {
        rates.sample = Math.max(0, (c.tokens_sampled - p.c.tokens_sampled) / dt);
        rates.train = Math.max(0, (c.tokens_trained - p.c.tokens_trained) / dt);
      }
      if (c) prev[r.name] = { time: d.time, c };
      sampleSum += rates.sample; trainSum += rates.train;
      return card(r, { sample: Math.round(rates.sample), train: Math.round(rates.train) }, d.replicas.length > 1 ? `r${i}-` : "live-");
    });
    cards.replaceChildren(...nodes);
    const x = Math.round(d.time - t0);
    hist.sample.push([x, sampleSum]); hist.train.push([x, trainSum]);
    for (const k of ["sample", "train"]) if (hist[k].length > HISTORY) hist[k].shift();
    trend.replaceChildren(lineChart("tokens/s", [{ name: "sampling", points: hist.sample }, { name: "training", points: hist.train }], { xLabel: "seconds" }));
    updated.textContent = `${d.healthy}/${d.total} replica${d.total === 1 ? "" : "s"} healthy · updated ${new Date(d.time * 1000).toLocaleTimeString()}`;
  }, 1000);
}
