"""Mixed: short requests' latency alone, then with long requests (long prompts, long outputs) running beside
them. The slowdown is head-of-line blocking: how much a long prefill or a full batch delays a short request
(chunked prefill is what keeps it small)."""

from __future__ import annotations

import asyncio
import random

from tinkerbell.bench import load
from tinkerbell.bench.context import Context, ScenarioResult, Table
from tinkerbell.bench.metrics import fmt, ratio

COLUMNS = ["short requests", "requests", "e2e p50 ms", "e2e p90 ms", "e2e p99 ms", "TTFT p50 ms", "TTFT p99 ms",
           "slowdown p50", "slowdown p99"]


async def _together(ctx: Context, short: list[load.RequestSpec], long_in: int, long_out: int,
                    rng: random.Random) -> tuple[load.LoadResult, int]:
    """Short requests while `long_concurrency` long requests keep running (each finished one is replaced
    until the short ones are done)."""
    t, z = ctx.target, ctx.sizes
    done = asyncio.Event()
    long_count = 0

    async def keep_long() -> None:
        nonlocal long_count
        while not done.is_set():
            specs = load.fixed_requests(rng, t, 1, long_in, long_out, "long")
            await load.drive(t, specs, 1, "long", False, seed=long_count)
            long_count += 1

    feeders = [asyncio.create_task(keep_long()) for _ in range(z.long_concurrency)]
    await asyncio.sleep(0.3)  # let the long prefills start first: that is the blocking being measured
    try:
        lr = await load.drive(t, short, z.short_concurrency, "mixed: short beside long", ctx.progress, seed=7)
    finally:
        done.set()
        await asyncio.gather(*feeders, return_exceptions=True)
    return lr, long_count


def run(ctx: Context) -> ScenarioResult:
    z, t = ctx.sizes, ctx.target
    rng = random.Random(ctx.seed + 2)
    res = ScenarioResult("mixed")
    s_in, s_out = load.fit(t, z.short_in, z.short_out)
    l_in, l_out = load.fit(t, z.long_in, z.long_out)
    alone = load.run_load(t, load.fixed_requests(rng, t, z.short_requests, s_in, s_out, "short"),
                          z.short_concurrency, "mixed: short alone", ctx.progress)
    together, n_long = asyncio.run(_together(ctx, load.fixed_requests(rng, t, z.short_requests, s_in, s_out,
                                                                     "short"), l_in, l_out, rng))
    a, b = alone.summary(), together.summary()
    rows = []
    for label, s in (("alone", a), (f"beside {z.long_concurrency} long", b)):
        rows.append([label, int(s["requests"]), fmt(s["e2e_ms_p50"]), fmt(s["e2e_ms_p90"]), fmt(s["e2e_ms_p99"]),
                     fmt(s["ttft_ms_p50"]), fmt(s["ttft_ms_p99"]),
                     fmt(ratio(s["e2e_ms_p50"], a["e2e_ms_p50"]), 2), fmt(ratio(s["e2e_ms_p99"], a["e2e_ms_p99"]), 2)])
    res.metrics.update({f"alone.{k}": a[k] for k in ("e2e_ms_p50", "e2e_ms_p99", "ttft_ms_p50", "ttft_ms_p99")})
    res.metrics.update({f"mixed.{k}": b[k] for k in ("e2e_ms_p50", "e2e_ms_p99", "ttft_ms_p50", "ttft_ms_p99")})
    res.metrics["slowdown_p50"] = ratio(b["e2e_ms_p50"], a["e2e_ms_p50"])
    res.metrics["slowdown_p99"] = ratio(b["e2e_ms_p99"], a["e2e_ms_p99"])
    res.metrics["long_requests_finished"] = float(n_long)
    res.tables.append(Table("Head-of-line blocking: short requests with and without long ones", COLUMNS, rows,
                            f"Short: {s_in} in / {s_out} out at concurrency {z.short_concurrency}. Long: {l_in} in / "
                            f"{l_out} out, {z.long_concurrency} kept in flight ({n_long} finished during the "
                            "measurement). Slowdown = latency beside long requests / latency alone."))
    res.series["cdf"] = {"alone": [r.e2e * 1000 for r in alone.ok()],
                         "beside long": [r.e2e * 1000 for r in together.ok()]}
    for lr in (alone, together):
        if lr.errors:
            res.notes.append(f"{lr.errors} short request(s) failed, first: {lr.first_error()}")
    return res
