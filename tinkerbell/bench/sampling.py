"""Sampling: output tokens/s, requests/s, TTFT and inter-token latency (p50/p90/p99) for three workloads
over streamed /v1/completions — one request at a time (batch-1 decode, against the memory-bandwidth
roofline), a fixed in/out batch, and a chat-like length distribution — with the HF `generate` peer beside."""

from __future__ import annotations

import random

from tinkerbell.bench import load, progress
from tinkerbell.bench.context import Context, ScenarioResult, Table
from tinkerbell.bench.metrics import fmt, ratio
from tinkerbell.bench.peer import PeerSample

COLUMNS = ["workload", "requests", "output tok/s", "req/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms",
           "peer tok/s", "ours/peer", "roofline tok/s"]


def _pct(s: dict[str, float], name: str) -> str:
    return "/".join(fmt(s[f"{name}_p{q}"]) for q in (50, 90, 99))


def _peer(ctx: Context, batch: int, in_len: int, out_len: int) -> PeerSample | None:
    if ctx.peer is None:
        return None
    return ctx.peer.sample(batch, in_len, min(out_len, ctx.sizes.peer_out_max))


def run(ctx: Context) -> ScenarioResult:
    z, t = ctx.sizes, ctx.target
    rng = random.Random(ctx.seed)
    res = ScenarioResult("sampling")
    rows, cdfs = [], {}
    buffered: list[str] = []  # workloads whose streams arrived in one burst per request

    def record(key: str, label: str, lr: load.LoadResult, peer: PeerSample | None, roof: float | None,
               ours_override: float | None = None) -> None:
        s = lr.summary()
        ours = ours_override if ours_override is not None else s["output_tok_s"]
        r = ratio(ours, peer.output_tok_s if peer else None)
        rows.append([label, int(s["requests"]), fmt(ours), fmt(s["req_s"], 2), _pct(s, "ttft_ms"),
                     _pct(s, "itl_ms"), fmt(peer.output_tok_s if peer else None), fmt(r, 2), fmt(roof)])
        res.metrics.update({f"{key}.{k}": v for k, v in s.items()})
        res.metrics[f"{key}.burst_share"] = lr.burst_share
        if lr.buffered:
            buffered.append(key)
        res.metrics[f"{key}.peer_output_tok_s"] = peer.output_tok_s if peer else None
        res.metrics[f"{key}.ratio_vs_peer"] = r
        cdfs[label] = {"ttft_ms": [r_.ttft * 1000 for r_ in lr.ok()], "e2e_ms": [r_.e2e * 1000 for r_ in lr.ok()]}
        if lr.errors:
            res.notes.append(f"{label}: {lr.errors} request(s) failed, first: {lr.first_error()}")

    # 1. One request at a time: per-request decode speed, the figure the bandwidth roofline bounds.
    in1, out1 = load.fit(t, z.single_in, z.single_out)
    lr = load.run_load(t, load.fixed_requests(rng, t, z.single_requests, in1, out1), 1, "sampling: batch 1",
                       ctx.progress)
    # Output tokens over end-to-end time, prefill included: the figure the peer's `generate` timing also
    # gives, and one that does not depend on how finely the server streams.
    per_req = [r.output_tokens / r.e2e for r in lr.ok() if r.e2e > 0]
    decode = sum(per_req) / len(per_req) if per_req else None
    wb = ctx.env.weight_bytes
    roof = ctx.env.peak_bandwidth / wb if ctx.env.peak_bandwidth and wb else None
    peer1 = _peer(ctx, 1, in1, out1)
    record("single", f"batch 1, {in1} in / {out1} out (tok/s per request)", lr, peer1, roof, decode)
    res.metrics["single.per_request_tok_s"] = decode
    res.metrics["single.roofline_tok_s"] = roof

    # 2. A fixed batch at a fixed concurrency.
    inf, outf = load.fit(t, z.fixed_in, z.fixed_out)
    lr = load.run_load(t, load.fixed_requests(rng, t, z.fixed_requests, inf, outf), z.fixed_concurrency,
                       "sampling: fixed", ctx.progress)
    peerf = _peer(ctx, min(z.peer_batch, z.fixed_requests), inf, outf)
    record("fixed", f"fixed {inf} in / {outf} out, concurrency {z.fixed_concurrency}", lr, peerf, None)

    # 3. Chat-like lengths: the peer's static batch would pad, so it has no row here.
    ins = load.lognormal_lengths(rng, z.dist_requests, z.dist_in_median, z.dist_in_max)
    outs = load.lognormal_lengths(rng, z.dist_requests, z.dist_out_median, z.dist_out_max)
    specs = []
    for a, b in zip(ins, outs):
        a, b = load.fit(t, a, b)
        specs.append(load.RequestSpec(load.random_prompt(rng, a, t.vocab_size), b))
    lr = load.run_load(t, specs, z.dist_concurrency, "sampling: distribution", ctx.progress)
    record("distribution", f"log-normal lengths (in median {z.dist_in_median}, out median {z.dist_out_median}), "
           f"concurrency {z.dist_concurrency}", lr, None, None)

    note = ("Streamed /v1/completions with the openai client; TTFT = first streamed text, ITL = gaps between "
            "streamed chunks (a busy server sends several tokens' text in one chunk: TPOT in results.json is "
            "per token). Batch 1: output tokens / end-to-end time per request (prefill included, so a little "
            "under the decode-only roofline even at its best).")
    if ctx.peer is not None:
        p = peerf or peer1
        note += (f" Peer: HF transformers generate, greedy, static batch ({p.batch} for the fixed row), "
                 f"{p.out_len} new tokens, on {ctx.peer.device}.")
    if roof is None:
        note += " Roofline: only on a GPU of known bandwidth with a local model folder."
    if buffered:
        res.notes.append(f"the stream delivered most completions in one burst at the end ({', '.join(buffered)}: "
                         "their text chunks arrived back to back, not spread over the generation): TTFT and ITL "
                         "here describe the streaming, not the decode speed")
    res.metrics["stream_buffered"] = 1.0 if buffered else 0.0
    res.tables.append(Table("Sampling throughput and latency", COLUMNS, rows, note))
    res.series["cdf"] = cdfs
    progress.say(f"  sampling: fixed {fmt(res.metrics['fixed.output_tok_s'])} tok/s")
    return res
