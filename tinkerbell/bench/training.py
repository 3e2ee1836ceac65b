"""Training through the tinker SDK: tokens/s for one user and for several users at once (their batches share
the engine's forward/backward), MFU where the device's peak and the model's size are known, sampling latency
while training runs, RL-style sampling (num_samples per prompt) from the trained weights, and the PEFT peer
on the same workload."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tinkerbell.bench import load, progress, sdk
from tinkerbell.bench.context import Context, ScenarioResult, Table
from tinkerbell.bench.metrics import fmt, ratio, summarize

COLUMNS = ["workload", "users", "tokens/s", "per user tokens/s", "step p50 ms", "loss first → last", "MFU",
           "peer tokens/s", "ours/peer"]
PROBE_COLUMNS = ["sampling probe", "requests", "e2e p50 ms", "e2e p99 ms", "TTFT p50 ms", "slowdown p50"]


def _tok_s(runs: list[sdk.UserRun]) -> float:
    """All users' tokens over the span from the first start to the last end (steps after each user's first,
    so one-time costs like creating the adapter stay out)."""
    tokens = sum(r.tokens_per_step * (len(r.step_seconds) - 1) for r in runs)
    span = max(r.end for r in runs) - min(r.start + (r.step_seconds[0] if r.step_seconds else 0) for r in runs)
    return tokens / span if span > 0 else float("nan")


def _mfu(ctx: Context, tok_s: float) -> float | None:
    # LoRA training: forward 2N + backward through activations 2N FLOPs per token; the frozen base weights
    # get no gradient (their 2N is skipped). Adapter FLOPs are negligible at these ranks.
    n, peak = ctx.env.params, ctx.env.peak_flops
    if not n or not peak or tok_s != tok_s:
        return None
    return 4 * n * tok_s / (peak * max(1, ctx.env.tp))


def _users(ctx: Context, users: int, desc: str, stop: threading.Event | None = None) -> list[sdk.UserRun]:
    z = ctx.sizes
    pbar = progress.bar(users, desc, ctx.progress)

    def one(u: int) -> sdk.UserRun:
        r, _ = sdk.train_user(ctx.target, u, z.train_steps, z.train_batch, z.train_seq, z.train_rank, z.train_lr,
                              seed=ctx.seed + 10 + u)
        pbar.update(1)
        return r

    with ThreadPoolExecutor(max_workers=users) as pool:
        runs = list(pool.map(one, range(users)))
    pbar.close()
    return runs


def _probe(ctx: Context, desc: str) -> load.LoadResult:
    z, t = ctx.sizes, ctx.target
    rng = random.Random(ctx.seed + 4)
    return load.run_load(t, load.fixed_requests(rng, t, z.probe_requests, z.probe_in, z.probe_out), 1, desc,
                         ctx.progress)


def _rl_sampling(ctx: Context) -> dict[str, float]:
    """A trained adapter's weights handed to a sampler in memory, then num_samples completions per prompt
    (an RL rollout's shape) through the SDK's SamplingClient."""
    from tinker import types

    z, t = ctx.sizes, ctx.target
    _, tc = sdk.train_user(t, 99, 1, 1, 32, z.train_rank, z.train_lr, seed=ctx.seed + 99)
    t0 = time.perf_counter()
    sampler = tc.save_weights_and_get_sampling_client().result()
    handoff = time.perf_counter() - t0
    rng = random.Random(ctx.seed + 5)
    params = types.SamplingParams(max_tokens=z.rl_out, temperature=1.0)
    t0 = time.perf_counter()
    futs = [sampler.sample(types.ModelInput.from_ints(load.random_prompt(rng, z.probe_in, t.vocab_size)),
                           num_samples=z.rl_samples, sampling_params=params) for _ in range(z.rl_prompts)]
    tokens = sum(len(s.tokens) for f in futs for s in f.result().sequences)
    wall = time.perf_counter() - t0
    return {"handoff_s": handoff, "tokens": float(tokens), "wall_s": wall, "tok_s": tokens / wall}


def run(ctx: Context) -> ScenarioResult:
    z = ctx.sizes
    res = ScenarioResult("training")
    rows = []
    peer = None
    if ctx.peer is not None:
        peer = ctx.peer.train(z.train_batch, sdk.train_seq(ctx.target, z.train_seq), z.peer_train_steps,
                              z.train_rank, z.train_lr)
    curves: dict[str, list[float]] = {}
    for label, users in (("one user", 1), (f"{z.train_users} users at once", z.train_users)):
        runs = _users(ctx, users, f"training: {label}")
        errors = [r.error for r in runs if r.error]
        if errors:
            res.notes.append(f"{label}: {len(errors)} user(s) failed, first: {errors[0]}")
        ok = [r for r in runs if not r.error and len(r.step_seconds) > 1]
        if not ok:
            raise RuntimeError(f"training ({label}) produced no timed steps: {errors[0] if errors else 'no steps'}")
        tok_s = _tok_s(ok)
        steps = summarize([s for r in ok for s in r.step_seconds[1:]], 1000.0)
        mfu = _mfu(ctx, tok_s)
        key = "single" if users == 1 else "multi"
        r_peer = ratio(tok_s, peer.tok_s) if peer and users == 1 else None
        losses = f"{ok[0].losses[0]:.3f} → {ok[0].losses[-1]:.3f}"
        rows.append([f"{label}: {z.train_batch} × {sdk.train_seq(ctx.target, z.train_seq)} tokens, rank "
                     f"{z.train_rank}, {z.train_steps} steps", users, fmt(tok_s), fmt(tok_s / users),
                     fmt(steps["p50"]), losses, fmt(100 * mfu, 1) + "%" if mfu is not None else "—",
                     fmt(peer.tok_s) if peer and users == 1 else "—", fmt(r_peer, 2)])
        res.metrics.update({f"{key}.tok_s": tok_s, f"{key}.step_ms_p50": steps["p50"], f"{key}.mfu": mfu})
        if users == 1:
            res.metrics["single.peer_tok_s"] = peer.tok_s if peer else None
            res.metrics["single.ratio_vs_peer"] = r_peer
        for r in ok:
            curves[f"{label}: user {r.user}"] = r.losses
    if peer is not None:
        curves["peer (PEFT)"] = peer.losses
    note = ("Tokens/s over all users' steps after each one's first; loss = mean per token of user 0. "
            "MFU = 4 × parameters × tokens/s / peak dense bf16 FLOP/s (LoRA: no base-weight gradients); "
            "only on a GPU of known peak.")
    if peer is not None:
        note += (f" Peer: PEFT LoRA (same rank, all block linears) + torch AdamW, one process, the same batch, "
                 f"{peer.steps} steps on {ctx.peer.device}.")
    res.tables.append(Table("Training throughput (tinker SDK)", COLUMNS, rows, note))

    # Sampling latency idle, then while several users train.
    idle = _probe(ctx, "training: sampling probe, idle")
    busy_runs: list[sdk.UserRun] = []
    trainer = threading.Thread(target=lambda: busy_runs.extend(_users(ctx, z.train_users, "training (busy)")))
    trainer.start()
    time.sleep(0.5)  # adapters created and the first batches queued before the probes start
    busy = _probe(ctx, "training: sampling probe, while training")
    trainer.join()
    a, b = idle.summary(), busy.summary()
    probe_rows = []
    for label, s in (("idle", a), (f"while {z.train_users} users train", b)):
        probe_rows.append([label, int(s["requests"]), fmt(s["e2e_ms_p50"]), fmt(s["e2e_ms_p99"]),
                           fmt(s["ttft_ms_p50"]), fmt(ratio(s["e2e_ms_p50"], a["e2e_ms_p50"]), 2)])
    res.metrics.update({"probe_idle.e2e_ms_p50": a["e2e_ms_p50"], "probe_busy.e2e_ms_p50": b["e2e_ms_p50"],
                        "probe.slowdown_p50": ratio(b["e2e_ms_p50"], a["e2e_ms_p50"])})
    res.tables.append(Table("Sampling latency while training runs", PROBE_COLUMNS, probe_rows,
                            f"One request at a time, {z.probe_in} in / {z.probe_out} out, /v1/completions."))

    rl = _rl_sampling(ctx)
    res.metrics.update({f"rl.{k}": v for k, v in rl.items()})
    res.tables.append(Table("RL-style sampling (tinker SDK SamplingClient)", ["prompts × samples", "tokens",
                            "tokens/s", "weights → sampler handoff ms"],
                            [[f"{z.rl_prompts} × {z.rl_samples}", int(rl["tokens"]), fmt(rl["tok_s"]),
                              fmt(rl["handoff_s"] * 1000)]],
                            f"save_weights_and_get_sampling_client (in memory, no disk), then sample(num_samples="
                            f"{z.rl_samples}, max_tokens={z.rl_out}) for every prompt at once."))
    res.series["loss_curves"] = curves
    return res
