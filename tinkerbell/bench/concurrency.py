"""Concurrency: the same fixed-length workload at 1…256 clients in flight; throughput against latency
(the curve shows where batching stops paying and queueing starts)."""

from __future__ import annotations

import random

from tinkerbell.bench import load
from tinkerbell.bench.context import Context, ScenarioResult, Table
from tinkerbell.bench.metrics import fmt

COLUMNS = ["clients", "requests", "output tok/s", "req/s", "e2e p50 ms", "e2e p99 ms", "TTFT p50 ms",
           "TTFT p99 ms", "errors"]


def run(ctx: Context) -> ScenarioResult:
    z, t = ctx.sizes, ctx.target
    rng = random.Random(ctx.seed + 1)
    res = ScenarioResult("concurrency")
    in_len, out_len = load.fit(t, z.sweep_in, z.sweep_out)
    rows, points = [], []
    for c in z.sweep:
        n = max(z.sweep_min_requests, 2 * c)
        lr = load.run_load(t, load.fixed_requests(rng, t, n, in_len, out_len), c, f"concurrency {c}", ctx.progress)
        s = lr.summary()
        rows.append([c, n, fmt(s["output_tok_s"]), fmt(s["req_s"], 2), fmt(s["e2e_ms_p50"]), fmt(s["e2e_ms_p99"]),
                     fmt(s["ttft_ms_p50"]), fmt(s["ttft_ms_p99"]), int(s["errors"])])
        points.append({"clients": c, **s})
        res.metrics.update({f"c{c}.{k}": s[k] for k in ("output_tok_s", "req_s", "e2e_ms_p50", "e2e_ms_p99",
                                                        "ttft_ms_p50", "errors")})
        if lr.errors:
            res.notes.append(f"{c} clients: {lr.errors} failed, first: {lr.first_error()}")
    best = max(points, key=lambda p: p["output_tok_s"])
    res.metrics["peak_output_tok_s"] = best["output_tok_s"]
    res.metrics["peak_at_clients"] = float(best["clients"])
    res.tables.append(Table("Throughput vs concurrency", COLUMNS, rows,
                            f"Each request {in_len} tokens in, {out_len} out; requests = max("
                            f"{z.sweep_min_requests}, 2 × clients). Peak {fmt(best['output_tok_s'])} tok/s at "
                            f"{best['clients']} clients."))
    res.series["points"] = points
    return res
