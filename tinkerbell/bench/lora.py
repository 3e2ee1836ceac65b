"""LoRA: the same sampling workload spread round-robin over 1…64 adapters, against the base model alone.
Adapters are trained briefly through the tinker SDK, saved, and registered with /v1/load_lora_adapter; beyond
`lora_trained` distinct ones, further names register the same checkpoints again (each name is its own slot,
so the engine serves them as separate adapters)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

from tinkerbell.bench import load, progress, sdk
from tinkerbell.bench.context import Context, ScenarioResult, Table
from tinkerbell.bench.metrics import fmt, ratio

COLUMNS = ["adapters", "requests", "output tok/s", "vs base", "e2e p50 ms", "e2e p99 ms", "TTFT p50 ms", "errors"]


def _train_and_save(ctx: Context, i: int) -> str:
    z = ctx.sizes
    _, tc = sdk.train_user(ctx.target, i, 1, 1, 32, z.lora_rank, z.train_lr, seed=100 + i)
    return tc.save_weights_for_sampler(f"bench-lora-{i}").result().path


def run(ctx: Context) -> ScenarioResult:
    z, t = ctx.sizes, ctx.target
    res = ScenarioResult("lora")
    counts = sorted(set(z.lora_counts))
    max_loras = int(t.info.get("max_loras") or 0)
    if max_loras and max(counts) > max_loras:
        res.notes.append(f"the server has {max_loras} LoRA slots: with more adapters than slots, adapters are "
                         "swapped in and out while serving (start it with --max-loras to avoid that)")
    n_train = max(1, min(z.lora_trained, max(counts)))
    pbar = progress.bar(n_train, "lora: training adapters", ctx.progress)
    with ThreadPoolExecutor(max_workers=n_train) as pool:
        paths = []
        for p in pool.map(lambda i: _train_and_save(ctx, i), range(n_train)):
            paths.append(p)
            pbar.update(1)
    pbar.close()
    names = [f"bench-lora-{i}" for i in range(max(counts))]
    for i, name in enumerate(names):
        sdk.register_adapter(t, name, paths[i % len(paths)])
    in_len, out_len = load.fit(t, z.lora_in, z.lora_out)
    rows, points = [], []
    base_tok_s = None
    try:
        for n in [0, *counts]:
            rng = random.Random(ctx.seed + 3)  # the same prompts at every count: only the adapters change
            specs = load.fixed_requests(rng, t, z.lora_requests, in_len, out_len)
            for j, spec in enumerate(specs):
                spec.model = names[j % n] if n else None
            lr = load.run_load(t, specs, z.lora_concurrency, f"lora: {n} adapters", ctx.progress)
            s = lr.summary()
            if n == 0:
                base_tok_s = s["output_tok_s"]
            rel = ratio(s["output_tok_s"], base_tok_s)
            rows.append(["base only" if n == 0 else n, int(s["requests"]), fmt(s["output_tok_s"]), fmt(rel, 2),
                         fmt(s["e2e_ms_p50"]), fmt(s["e2e_ms_p99"]), fmt(s["ttft_ms_p50"]), int(s["errors"])])
            points.append({"adapters": n, **s})
            key = "base" if n == 0 else f"a{n}"
            res.metrics.update({f"{key}.output_tok_s": s["output_tok_s"], f"{key}.e2e_ms_p50": s["e2e_ms_p50"],
                                f"{key}.errors": s["errors"]})
            if n:
                res.metrics[f"{key}.vs_base"] = rel
            if lr.errors:
                res.notes.append(f"{n} adapters: {lr.errors} failed, first: {lr.first_error()}")
    finally:
        for name in names:
            sdk.unregister_adapter(t, name)
    res.tables.append(Table("Multi-LoRA sampling", COLUMNS, rows,
                            f"{z.lora_requests} requests ({in_len} in / {out_len} out) at concurrency "
                            f"{z.lora_concurrency}, round-robin over the adapters; rank {z.lora_rank}, "
                            f"{n_train} distinct adapter(s) trained one step each. vs base = tok/s / base-only tok/s."))
    res.series["points"] = points
    return res
