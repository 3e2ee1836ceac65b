"""Scaling: the same workload against servers started at DP 1, 2, … (each replica on its own GPU group when
there are GPUs; on one GPU or a CPU the replicas share it, which the table says). Needs the benchmark to start
the servers (--model); against --url there is only the one deployment, so it is skipped."""

from __future__ import annotations

import random

from tinkerbell.bench import load, progress
from tinkerbell.bench.context import Context, ScenarioResult, Table, Target
from tinkerbell.bench.metrics import fmt, ratio

COLUMNS = ["DP", "TP", "output tok/s", "req/s", "e2e p50 ms", "e2e p99 ms", "speedup", "efficiency", "errors"]


def run(ctx: Context) -> ScenarioResult:
    z = ctx.sizes
    res = ScenarioResult("scaling")
    if ctx.launcher is None:
        res.status, res.reason = "skipped", "needs the benchmark to start the servers (--model, not --url)"
        return res
    dps = sorted(set(ctx.scaling_dp))
    if len(dps) < 2:
        res.status = "skipped"
        res.reason = (f"one data-parallel size to try ({dps}); pass --scaling-dp 1,2 (replicas share the "
                      "GPUs when there are fewer GPUs than replicas × TP)")
        return res
    rows, points = [], []
    base = None
    for dp in dps:
        progress.say(f"  scaling: starting a server with --dp {dp}")
        server = ctx.launcher.start(dp=dp, name=f"scaling-dp{dp}")
        try:
            t = Target(server.url, server.api_key, ctx.target.model, ctx.target.info)
            load.warm_up(t)
            rng = random.Random(ctx.seed + 6)
            specs = load.fixed_requests(rng, t, z.scaling_requests, z.scaling_in, z.scaling_out)
            lr = load.run_load(t, specs, z.scaling_concurrency, f"scaling: dp {dp}", ctx.progress)
        finally:
            server.stop()
        s = lr.summary()
        base = s["output_tok_s"] if base is None else base
        speedup = ratio(s["output_tok_s"], base)
        eff = speedup / (dp / dps[0]) if speedup is not None else None
        rows.append([dp, ctx.launcher.tp, fmt(s["output_tok_s"]), fmt(s["req_s"], 2), fmt(s["e2e_ms_p50"]),
                     fmt(s["e2e_ms_p99"]), fmt(speedup, 2), fmt(eff, 2), int(s["errors"])])
        points.append({"dp": dp, "speedup": speedup, "efficiency": eff, **s})
        res.metrics.update({f"dp{dp}.output_tok_s": s["output_tok_s"], f"dp{dp}.speedup": speedup,
                            f"dp{dp}.efficiency": eff})
        if lr.errors:
            res.notes.append(f"dp {dp}: {lr.errors} failed, first: {lr.first_error()}")
    gpus = len(ctx.env.gpus)
    shared = "" if gpus >= max(dps) * ctx.launcher.tp else (
        f" {f'Only {gpus} GPU(s) visible' if gpus else 'No GPU (a CPU run)'}: the replicas share the hardware, so "
        "this measures the router and process overhead, not added capacity.")
    res.tables.append(Table("Data-parallel scaling", COLUMNS, rows,
                            f"{z.scaling_requests} requests, {z.scaling_in} in / {z.scaling_out} out, concurrency "
                            f"{z.scaling_concurrency}, through the router for DP > 1. Speedup against DP "
                            f"{dps[0]}; efficiency = speedup / (DP / {dps[0]}).{shared}"))
    res.series["points"] = points
    return res
