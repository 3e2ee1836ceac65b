"""Sampling speed of our engine against HF transformers on random-weight models of real shapes, plus GPU
correctness checks of the fast path. One command, one device run:

    PYTHONPATH=. python3 bench/sampling_speed.py [--quick] [--skip-8b] [--json OUT.json]

Models are built in memory (bf16, on the GPU, normal(0, 0.02) weights; no download, no disk). Figures:
(a) 1 request, 128 prompt / 512 new tokens: decode tok/s (after the first token);
(b) 256 requests, 128 / 128: output tok/s over the whole run (prefill included);
(c) (b) with 64 distinct rank-32 adapters (all modules + lm_head) vs none (1B only).
(a) and (b) run twice on the same warm sampler: synchronous decode (each step's tokens read before the next
step is launched) and asynchronous decode (sampler_async.py: step n+1 launched before step n is read, the
default); the table shows both. A temperature-0 run of each in both modes must give identical tokens (a check).
The peer is HF `generate` (static batch, greedy, DynamicCache) in the same process; it runs fewer new tokens
(its rate is flat in the output length at these sizes), which the table states.
Checks (PASS/FAIL): Triton paged attention, SGMV LoRA and the Gumbel sampler against their torch forms on the
GPU (float32), and greedy tokens of the fast path (graphs, kernels, fused projections, gathered LoRA) equal to
the reference path (per-span SDPA, segment-loop LoRA), both on the GPU in float32.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import time
from concurrent.futures import Future

import numpy as np
import torch

from tinkerbell.engine.batch import SeqSpan
from tinkerbell.engine.kernels import fused_layer as fl
from tinkerbell.engine.kernels import gumbel_sample as gs
from tinkerbell.engine.kernels.lora_sgmv import LoraTiles, lora_apply, lora_apply_torch, plan_tiles
from tinkerbell.engine.kernels.paged_attention import meta_for_spans, paged_attention, paged_attention_torch
from tinkerbell.engine.lora import AdapterWeights, LoraSpec, module_shape
from tinkerbell.engine.models.config import ModelConfig
from tinkerbell.engine.models.llama import CausalLM
from tinkerbell.engine.sampler import Sampler
from tinkerbell.engine.types import SampleJob

PROFILE_DIR: str | None = None  # --profile-dir: where profile_decode writes its tables
HBM_BYTES_PER_S = 2.9e12  # H100 SXM HBM3, as the roofline
SHAPES = {
    "Llama-3.2-1B": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}
ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


def hf_dict(name: str, **over) -> dict:
    d = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
             rope_scaling=ROPE, bos_token_id=128000, eos_token_id=128001, **SHAPES[name])
    d.update(over)
    return d


def build_ours(cfg_dict: dict, dtype: torch.dtype, seed: int = 0) -> CausalLM:
    cfg = ModelConfig.from_hf_dict(cfg_dict)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device="cuda")
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model = model.to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = cfg.inv_freq().cuda()
    return model.requires_grad_(False).eval()


def weight_bytes(model: CausalLM) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once (read as lm_head)


def make_sampler(model: CausalLM, dtype: torch.dtype, *, fast: bool, max_loras: int = 0, rank: int = 32,
                 num_blocks: int = 6000, max_batch_tokens: int = 8192, async_decode: bool | None = None) -> Sampler:
    return Sampler(model, torch.device("cuda"), dtype, max_loras, rank, 16, num_blocks, 1024, [],
                   lambda ids: "", max_batch_tokens=max_batch_tokens, max_running_seqs=256, fast=fast,
                   async_decode=async_decode)


def random_adapter(cfg: ModelConfig, rank: int, seed: int, dtype: torch.dtype, scale_b: float = 0.02) -> AdapterWeights:
    spec = LoraSpec(rank=rank)
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = AdapterWeights(spec=spec)
    for key in spec.target_keys(cfg):
        fan_in, fan_out = module_shape(cfg, key)
        w.a[key] = (torch.randn(rank, fan_in, device="cuda", generator=g) / math.sqrt(fan_in)).to(dtype)
        w.b[key] = (torch.randn(fan_out, rank, device="cuda", generator=g) * scale_b).to(dtype)
    return w


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, length).tolist() for _ in range(n)]


def drive(sampler: Sampler, jobs: list[SampleJob]) -> tuple[list, float, float]:
    """Run jobs to completion; (results, total seconds, seconds until the first step's tokens)."""
    futs = []
    for j in jobs:
        f: Future = Future()
        sampler.add_request(j, f)
        futs.append(f)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    first = None
    while sampler.has_work():
        sampler.step()
        if first is None and sampler.stats()["tokens_generated"] > 0:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return [f.result(timeout=0) for f in futs], total, first or total


# ----------------------------------------------------------------------------------------------- checks


def check_kernels(report: dict) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        heads, kvh, d, bs = 32, 8, 64, 16
        slots_total = 200 * bs
        kc = torch.randn(slots_total, kvh, d, device="cuda", generator=g).to(dtype)
        vc = torch.randn(slots_total, kvh, d, device="cuda", generator=g).to(dtype)
        perm = torch.randperm(200, device="cuda", generator=g).tolist()
        spans, start = [], 0
        for n, c in ((1, 300), (1, 17), (40, 40), (25, 130), (1, 1)):
            spans.append(SeqSpan(start, n, c, [perm.pop() for _ in range(-(-c // bs))]))
            start += n
        q = torch.randn(start, heads, d, device="cuda", generator=g).to(dtype)
        meta = meta_for_spans(spans, "cuda")
        out = paged_attention(q, kc, vc, meta, bs)
        ref = paged_attention_torch(q.float(), kc.float(), vc.float(), meta, bs)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        report[f"attention_rel_err_{str(dtype)[6:]}"] = err
        report.setdefault("checks", {})[f"triton attention vs torch ({str(dtype)[6:]})"] = err < tol
    # SGMV LoRA, float32: 300 rows over 5 slots (+ rows without adapter).
    s, r, k, n = 5, 32, 2048, 3000
    a = torch.randn(s, r, k, device="cuda", generator=g) / 40
    b = torch.randn(s, n, r, device="cuda", generator=g) / 5
    scales = torch.rand(s, device="cuda", generator=g)
    row_slots = np.random.default_rng(0).integers(-1, s, 300)
    rows, tiles = plan_tiles(row_slots, num_tiles=64)
    t = torch.from_numpy(np.ascontiguousarray(tiles.T)).cuda()
    plan = LoraTiles(torch.from_numpy(rows).cuda(), t[0], t[1], t[2])
    x = torch.randn(300, k, device="cuda", generator=g)
    base = torch.randn(300, n, device="cuda", generator=g)
    got = lora_apply(x, base.clone(), a, b, scales, plan)
    ref = lora_apply_torch(x, base.clone(), a, b, scales, plan)
    err = ((got - ref).norm() / (ref - base).norm()).item()
    report["lora_rel_err_float32"] = err
    report["checks"]["triton SGMV LoRA vs torch (float32)"] = err < 1e-4
    # Same, with slot 2's adapter not targeting the module (its tiles are skipped; its weights are zeros).
    a[2], b[2] = 0, 0
    present = torch.tensor([1, 1, 0, 1, 1], dtype=torch.int32, device="cuda")
    got = lora_apply(x, base.clone(), a, b, scales, plan, present)
    ref = lora_apply_torch(x, base.clone(), a, b, scales, plan)
    err = ((got - ref).norm() / (ref - base).norm()).item()
    report["lora_skip_rel_err_float32"] = err
    report["checks"]["triton SGMV LoRA, absent-module slots skipped, vs torch (float32)"] = err < 1e-4
    check_fused(report, g)
    # The kernel splits each row's vocabulary over several programs (more the fewer rows): 1, 64, 256 rows.
    for rows in (1, 64, 256):
        logits = torch.randn(rows, 128256, device="cuda", generator=g) * 3
        temps = torch.rand(rows, device="cuda", generator=g) + 0.2
        temps[:rows // 8] = 0
        keys = gs.row_keys(torch.arange(rows) * 7919, torch.full((rows,), 130)).cuda()
        got, ref = gs.sample_rows(logits, temps, keys), gs.sample_rows_torch(logits, temps, keys)
        same = (got == ref).float().mean().item()
        report[f"gumbel_rows_equal_{rows}"] = same
        # float log rounding may flip a near-tie between the kernel and torch (never more than ~1 row in 64)
        report["checks"][f"triton Gumbel sampler vs torch, {rows} rows (rows equal)"] = same >= 1 - 1 / 32
        # The graph's form: one pass over bf16 logits also gives each token's raw logprob and the logsumexp.
        lb = logits.bfloat16()
        tok, both, lse = gs.sample_rows_logprob(lb, temps, keys)
        rtok, rboth, rlse = gs.sample_rows_logprob_torch(lb, temps, keys)
        eq = tok == rtok
        lp_err = (both[1] - rboth[1])[eq].abs().max().item()
        lse_err = ((lse - rlse).abs() / rlse.abs()).max().item()
        report[f"gumbel_logprob_rows_{rows}"] = {"equal": eq.float().mean().item(), "lp_abs_err": lp_err,
                                                 "lse_rel_err": lse_err}
        report["checks"][f"triton Gumbel + logprob (bf16 logits) vs torch, {rows} rows"] = (
            eq.float().mean().item() >= 1 - 1 / 32 and lp_err < 1e-4 and lse_err < 1e-6
            and torch.equal(both[0], tok.double()))
    # The single-row GEMV (o_proj, LM head at batch 1) vs F.linear, float32 and bfloat16.
    from tinkerbell.engine.kernels.gemv import linear
    for n, k in ((2048, 2048), (128256, 2048)):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            w = (torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k)).to(dtype)
            x = torch.randn(1, k, device="cuda", generator=g).to(dtype)
            with torch.inference_mode():
                got = linear(x, w).float()
            ref = x.double() @ w.double().t()
            err = ((got.double() - ref).norm() / ref.norm()).item()
            report[f"gemv_rel_err_{n}x{k}_{str(dtype)[6:]}"] = err
            report["checks"][f"triton GEMV {n}x{k} vs float64 ({str(dtype)[6:]})"] = err < tol


def check_fused(report: dict, g: torch.Generator) -> None:
    """Fused layer kernels and split-context attention vs their torch forms, float32 (bf16 for the norm too)."""
    from tinkerbell.engine.kernels._paged_attention_triton import launch as attn_launch

    errs = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(300, 2048, device="cuda", generator=g).to(dtype)
        res = torch.randn(300, 2048, device="cuda", generator=g).to(dtype)
        w = (torch.rand(2048, device="cuda", generator=g) + 0.5).to(dtype)
        out, r = fl.add_rmsnorm(x, res.clone(), w, 1e-5)
        ref, rr = fl.add_rmsnorm_torch(x, res.clone(), w, 1e-5)
        errs[f"add_rmsnorm_{str(dtype)[6:]}"] = max(((out.float() - ref.float()).norm() / ref.float().norm()).item(),
                                                  ((r.float() - rr.float()).norm() / rr.float().norm()).item())
    t, h, kvh, d = 300, 32, 8, 64
    qkv = torch.randn(t, (h + 2 * kvh) * d, device="cuda", generator=g)
    q, k, v = (p.view(t, -1, d) for p in qkv.split([h * d, kvh * d, kvh * d], dim=-1))
    freqs = torch.randint(0, 4000, (t,), device="cuda", generator=g).float()[:, None] * (
        1.0 / 500000 ** (torch.arange(0, d, 2, device="cuda").float() / d))[None, :]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    slots = torch.randperm(4000, device="cuda", generator=g)[:t]
    caches = [torch.randn(4000, kvh, d, device="cuda", generator=g) for _ in range(2)]
    caches += [c.clone() for c in caches]  # the torch form writes into copies of the same caches
    qa = fl.rope_cache_write(q, k, v, cos, sin, caches[0], caches[1], slots)
    qb = fl.rope_cache_write_torch(q, k, v, cos, sin, caches[2], caches[3], slots)
    errs["rope_cache_write_float32"] = max(((qa - qb).norm() / qb.norm()).item(),
                                           ((caches[0] - caches[2]).norm() / caches[2].norm()).item(),
                                           ((caches[1] - caches[3]).norm() / caches[3].norm()).item())
    gu = torch.randn(300, 2 * 8192, device="cuda", generator=g)
    ref = fl.silu_mul_torch(gu)
    errs["silu_mul_float32"] = ((fl.silu_mul(gu) - ref).norm() / ref.norm()).item()
    # Split-context attention (the small-batch decode form), decode rows over long shuffled contexts.
    bs = 16
    kc = torch.randn(300 * bs, kvh, d, device="cuda", generator=g)
    vc = torch.randn(300 * bs, kvh, d, device="cuda", generator=g)
    perm = torch.randperm(300, device="cuda", generator=g).tolist()
    spans = [SeqSpan(i, 1, c, [perm.pop() for _ in range(-(-c // bs))]) for i, c in enumerate((1, 17, 640, 1000))]
    meta = meta_for_spans(spans, "cuda")
    qd = torch.randn(4, h, d, device="cuda", generator=g)
    ref = paged_attention_torch(qd, kc, vc, meta, bs)
    for splits in (2, 8, 16):
        out = attn_launch(qd, kc, vc, meta.block_tables, meta.token_seq, meta.token_ctx, bs, splits=splits)
        errs[f"split_attention_{splits}_float32"] = ((out - ref).norm() / ref.norm()).item()
    report["fused_rel_err"] = errs
    for name, err in errs.items():
        report["checks"][f"triton {name} vs torch"] = err < (1e-2 if "bfloat16" in name else 1e-4)


def check_greedy(report: dict, quick: bool) -> None:
    """Fast path vs reference, float32 on the GPU, 1B shapes with 4 layers, with and without adapters."""
    model = build_ours(hf_dict("Llama-3.2-1B", num_hidden_layers=4), torch.float32, seed=1)
    cfg = model.cfg
    ps = prompts(6, 40, cfg.vocab_size, seed=3) + prompts(2, 130, cfg.vocab_size, seed=4)
    adapters = {f"a{i}": random_adapter(cfg, 8 + 8 * i, seed=10 + i, dtype=torch.float32, scale_b=0.2)
                for i in range(2)}
    keys = [None, "a0", "a1"]
    n_new = 24 if quick else 48
    # Rows 1 and 4 stop on a token id (random models repeat themselves, so these fire mid-way and the
    # asynchronous path discards a computed row); the others run to max_tokens.
    stops = {1: list(range(0, 128256, 7)), 4: list(range(3, 128256, 11))}
    jobs = lambda: [SampleJob(prompt=p, max_tokens=n_new, temperature=0.0, stop_at_eos=False,  # noqa: E731
                              adapter_key=keys[i % 3], stop_token_ids=stops.get(i, []),
                              topk_sample_logprobs=2 if i == 5 else 0) for i, p in enumerate(ps)]
    outs = {}
    for mode in ("reference", "fast sync", "fast async"):
        sampler = make_sampler(model, torch.float32, fast=mode != "reference", max_loras=2, rank=16, num_blocks=400,
                               max_batch_tokens=96, async_decode=mode == "fast async")  # prefill chunks beside decodes
        for k, w in adapters.items():
            sampler.register_adapter(k, w)
        outs[mode], _, _ = drive(sampler, jobs())
        if mode == "fast async":
            report["greedy_check_graph_steps"] = sampler.runner.graph_steps
            report["greedy_check_async_steps"] = sampler._async.launched
    for mode in ("fast sync", "fast async"):
        equal = [r.sequences[0].tokens == f.sequences[0].tokens for r, f in zip(outs["reference"], outs[mode])]
        lp = max(float(np.abs(np.array(r.sequences[0].logprobs) - np.array(f.sequences[0].logprobs)).max())
                 for r, f, e in zip(outs["reference"], outs[mode], equal) if e) if any(equal) else float("nan")
        report[f"greedy_equal_{mode}"] = f"{sum(equal)}/{len(equal)}"
        report[f"greedy_logprob_max_diff_{mode}"] = lp
        report["checks"][f"greedy {mode} == reference (float32, GPU, adapters, stop tokens)"] = all(equal)
    # Batch 1 runs every projection through the GEMV (and, on Hopper, the PDL chain): its own check.
    solo = lambda: [SampleJob(prompt=ps[6], max_tokens=n_new, temperature=0.0, stop_at_eos=False)]  # noqa: E731
    solo_out = {}
    for mode in ("reference", "fast async"):
        sampler = make_sampler(model, torch.float32, fast=mode != "reference", num_blocks=400,
                               async_decode=mode == "fast async")
        solo_out[mode], _, _ = drive(sampler, solo())
    report["checks"]["greedy batch 1 fast async == reference (float32, GPU)"] = (
        solo_out["reference"][0].sequences[0].tokens == solo_out["fast async"][0].sequences[0].tokens)
    lens = [len(r.sequences[0].tokens) for r in outs["reference"]]
    report["greedy_check_lengths"] = lens
    report["checks"]["greedy check: some rows stop early, async steps ran"] = (
        min(lens) < n_new and report["greedy_check_async_steps"] > 0)
    del model
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- speed


def bench_ours(name: str, report: dict, quick: bool, with_lora: bool) -> None:
    model = build_ours(hf_dict(name), torch.bfloat16)
    cfg = model.cfg
    wb = weight_bytes(model)
    res = report.setdefault(name, {})
    res["weight_gb"] = wb / 1e9
    res["roofline_batch1_tok_s"] = HBM_BYTES_PER_S / wb
    n_req = 64 if quick else 256
    blocks = n_req * 256 // 16 + 600
    sampler = make_sampler(model, torch.bfloat16, fast=True, max_loras=64 if with_lora else 0, num_blocks=blocks)
    sampler.runner.graph_steps = 0
    # Warm-up: compiles kernels and captures the graphs of the buckets the runs below use.
    drive(sampler, [SampleJob(prompt=p, max_tokens=4, temperature=1.0, seed=1, stop_at_eos=False)
                    for p in prompts(n_req, 128, cfg.vocab_size, 9)])
    drive(sampler, [SampleJob(prompt=prompts(1, 128, cfg.vocab_size, 8)[0], max_tokens=4, stop_at_eos=False)])
    # (a) one request, (b) many requests: synchronous decode, then asynchronous (the default) on the same
    # warm sampler; the same seeds, so both draw the same tokens.
    p1 = prompts(1, 128, cfg.vocab_size, 1)[0]
    ps = prompts(n_req, 128, cfg.vocab_size, 2)
    mk = lambda key=None, temp=1.0, new=128, n=n_req: [  # noqa: E731
        SampleJob(prompt=p, max_tokens=new, temperature=temp, seed=i, stop_at_eos=False,
                  adapter_key=key(i) if key else None) for i, p in enumerate(ps[:n])]
    res["batch_requests"] = n_req
    toks: dict[str, list] = {}
    for mode in ("sync", "async"):
        sampler.async_decode = mode == "async"
        sampler._async.wait_s = 0.0
        # Every run starts with an empty prefix cache: the same prompts, computed the same way, in both modes.
        sampler.blocks.reset()
        out, total, first = drive(sampler, [SampleJob(prompt=p1, max_tokens=512, temperature=1.0, seed=0,
                                                      stop_at_eos=False)])
        res[f"batch1_decode_tok_s_{mode}"] = 511 / (total - first)
        res[f"batch1_ttft_s_{mode}"] = first
        if mode == "async":
            res["batch1_async_wait_share"] = sampler._async.wait_s / total  # host blocked on the GPU
        toks[f"b1_t1_{mode}"] = out[0].sequences[0].tokens
        sampler._async.wait_s = 0.0
        sampler.blocks.reset()
        out, total, _ = drive(sampler, mk())
        res[f"batch_output_tok_s_{mode}"] = n_req * 128 / total
        if mode == "async":
            res["batch_async_wait_share"] = sampler._async.wait_s / total
        toks[f"bn_t1_{mode}"] = [r.sequences[0].tokens for r in out]
        # Temperature 0: async tokens must equal sync tokens. 64 prompts of 128 tokens prefill in one step
        # (8192-token budget), so every decode step has the same rows in both modes, hence the same logits.
        # (In the 256-request run above the prefill is chunked beside decodes, which the asynchronous loop
        # batches differently — decode rows in the graph, the chunk beside — so bf16 rounding may differ there.)
        sampler.blocks.reset()
        out, _, _ = drive(sampler, [SampleJob(prompt=p1, max_tokens=128, temperature=0.0, stop_at_eos=False)])
        toks[f"b1_t0_{mode}"] = out[0].sequences[0].tokens
        sampler.blocks.reset()
        out, _, _ = drive(sampler, mk(temp=0.0, new=64, n=64))
        toks[f"b64_t0_{mode}"] = [r.sequences[0].tokens for r in out]
    sampler.async_decode = True
    res["batch1_decode_tok_s"] = res["batch1_decode_tok_s_async"]
    res["batch1_ttft_s"] = res["batch1_ttft_s_async"]
    res["batch_output_tok_s"] = res["batch_output_tok_s_async"]
    for key, what in (("b1_t0", "1 request, temperature 0"), ("b64_t0", "64 requests, temperature 0"),
                      ("b1_t1", "1 request, temperature 1, seeded")):
        report["checks"][f"{name}: async tokens == sync tokens ({what})"] = toks[f"{key}_sync"] == toks[f"{key}_async"]
    res["batch_t1_async_sequences_equal_sync"] = float(np.mean([a == b for a, b in zip(toks["bn_t1_sync"],
                                                                                      toks["bn_t1_async"])]))
    if with_lora:
        for i in range(64):
            sampler.register_adapter(f"r{i}", random_adapter(cfg, 32, seed=100 + i, dtype=torch.bfloat16))
        drive(sampler, [SampleJob(prompt=p, max_tokens=4, adapter_key=f"r{i % 64}", stop_at_eos=False)
                        for i, p in enumerate(ps)])  # loads the slots, captures the LoRA graphs
        _, total, _ = drive(sampler, mk(lambda i: f"r{i % 64}"))
        res["batch_lora64_output_tok_s"] = n_req * 128 / total
    if with_lora:
        ttft_and_handoff(sampler, res, cfg)
    res["graph_steps"], res["eager_steps"] = sampler.runner.graph_steps, sampler.runner.eager_steps
    st = sampler.stats()
    res["async_steps"], res["async_joins"], res["async_side_steps"] = (st["async_steps"], st["async_joins"],
                                                                        st["async_side_steps"])
    # Where a decode step's time goes: the captured forward alone (GPU) vs the measured step (GPU + host).
    for bucket in (1, 256 if n_req == 256 else 64):
        graph = sampler.runner._graphs.get((bucket, False))
        if graph is None or graph.graph is None:
            continue
        sampler.runner._pad()  # every row writes the scratch block
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.graph.replay()
        start.record()
        for _ in range(50):
            graph.graph.replay()
        end.record()
        torch.cuda.synchronize()
        res[f"graph_forward_ms_b{bucket}"] = start.elapsed_time(end) / 50
    if PROFILE_DIR:
        profile_decode(sampler, name, res)
    del sampler, model
    torch.cuda.empty_cache()


def ttft_and_handoff(sampler: Sampler, res: dict, cfg: ModelConfig) -> None:
    """Engine-level (no HTTP): (d) time to first token of 64 requests submitted at once (128 in / 64 out);
    (e) a fresh rank-32 adapter handed over in memory (what Engine.publish_to_sampler does after the trainer's
    snapshot) and sampled at once: register → first token, median of 5."""
    firsts: dict[int, float] = {}

    def hook(i: int):
        return lambda _idx, _tok, _lp: firsts.setdefault(i, time.perf_counter())

    ps = prompts(64, 128, cfg.vocab_size, 21)
    jobs = [SampleJob(prompt=p, max_tokens=64, temperature=1.0, seed=i, stop_at_eos=False, on_token=hook(i))
            for i, p in enumerate(ps)]
    t0 = time.perf_counter()
    drive(sampler, jobs)
    ttft = np.array([firsts[i] - t0 for i in range(64)]) * 1000
    res["ttft64_p50_ms"], res["ttft64_p99_ms"] = float(np.percentile(ttft, 50)), float(np.percentile(ttft, 99))
    times = []
    for trial in range(5):
        w = random_adapter(cfg, 32, seed=500 + trial, dtype=torch.bfloat16)
        got: list[float] = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler.register_adapter(f"fresh{trial}", w)
        job = SampleJob(prompt=ps[trial], max_tokens=1, adapter_key=f"fresh{trial}", stop_at_eos=False,
                        on_token=lambda *_: got.append(time.perf_counter()))
        drive(sampler, [job])
        times.append((got[0] - t0) * 1000)
    res["handoff_first_token_ms"] = float(np.median(times))
    res["handoff_first_token_ms_all"] = times


def profile_decode(sampler: Sampler, name: str, res: dict) -> None:
    """Top GPU kernels of the captured batch-1 decode step (20 replays), to $OUT."""
    from torch.profiler import ProfilerActivity, profile

    graph = sampler.runner._graphs.get((1, False))
    if graph is None or graph.graph is None:
        return
    sampler.runner._pad()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            graph.graph.replay()
        torch.cuda.synchronize()
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    with open(f"{PROFILE_DIR}/profile_{name}_b1.txt", "w") as fh:
        fh.write(text)
    res["profile_top_b1"] = [line[:150] for line in text.splitlines()[:14]]


def bench_hf(name: str, report: dict, quick: bool, batch: int, new_tokens: int, key: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    d = hf_dict(name)
    d.pop("model_type")
    config = LlamaConfig(**d)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    ids = torch.tensor(prompts(batch, 128, config.vocab_size, 5), device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        torch.cuda.synchronize()
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
    res = report.setdefault(name, {})
    if batch == 1:
        res[key] = (new_tokens - 1) / (total - t_prefill)
    else:
        res[key] = batch * new_tokens / total
    res[key + "_setup"] = f"batch {batch}, {new_tokens} new tokens"
    del model
    torch.cuda.empty_cache()


def table(report: dict) -> str:
    lines = [f"device: {report['device']}   date: {report['date']}   torch {report['torch']}",
             "| figure | ours | HF peer (same run) | target | roofline |", "|---|---|---|---|---|"]
    for name in SHAPES:
        r = report.get(name)
        if not r:
            continue
        f = lambda k: f"{r[k]:,.0f}" if k in r else "—"  # noqa: E731
        lines.append(f"| {name}, 1 request 128 in / 512 out, decode tok/s | {f('batch1_decode_tok_s')} | "
                     f"{f('hf_batch1_tok_s')} ({r.get('hf_batch1_tok_s_setup', '')}) | "
                     f"{'≥ 800' if '1B' in name else '≥ 155'} | {f('roofline_batch1_tok_s')} |")
        if "graph_forward_ms_b1" in r:
            step = 1000 / r["batch1_decode_tok_s"]
            lines.append(f"|   (batch 1, async: step {step:.2f} ms = captured forward {r['graph_forward_ms_b1']:.2f} ms on the "
                         f"GPU + {step - r['graph_forward_ms_b1']:.2f} ms not hidden: sampling kernels, copies, host "
                         f"time the overlap did not cover) | | | | |")
        if "batch1_decode_tok_s_sync" in r:
            lines.append(f"|   (batch 1: synchronous decode {f('batch1_decode_tok_s_sync')} → asynchronous "
                         f"{f('batch1_decode_tok_s_async')} tok/s; host waiting on the GPU "
                         f"{r.get('batch1_async_wait_share', float('nan')):.0%} of the async run) | | | | |")
        lines.append(f"| {name}, {r.get('batch_requests', '?')} requests 128 in / 128 out, output tok/s | "
                     f"{f('batch_output_tok_s')} | {f('hf_batch_tok_s')} ({r.get('hf_batch_tok_s_setup', '')}) | "
                     f"{'≥ 30k' if '1B' in name else '≥ 16k'} | |")
        if "batch_output_tok_s_sync" in r:
            lines.append(f"|   ({r.get('batch_requests', '?')} requests: synchronous decode "
                         f"{f('batch_output_tok_s_sync')} → asynchronous {f('batch_output_tok_s_async')} tok/s; "
                         f"host waiting on the GPU {r.get('batch_async_wait_share', float('nan')):.0%}) | | | | |")
        if "ttft64_p50_ms" in r:
            lines.append(f"| {name}, TTFT of 64 requests submitted at once (engine-level, 128 in / 64 out), p50 / p99 ms | "
                         f"{r['ttft64_p50_ms']:.0f} / {r['ttft64_p99_ms']:.0f} | | p99 ≤ 3× p50 | |")
            lines.append(f"| {name}, first token after an in-memory r32 adapter handoff (register → token), ms | "
                         f"{r['handoff_first_token_ms']:.1f} | | ≤ 50 | |")
        if "batch_lora64_output_tok_s" in r:
            slow = 1 - r["batch_lora64_output_tok_s"] / r["batch_output_tok_s"]
            lines.append(f"| {name}, same with 64 rank-32 adapters, output tok/s | "
                         f"{f('batch_lora64_output_tok_s')} ({slow:+.1%} slower) | | ≤ 10% slower | |")
    lines.append("")
    for k, ok in report.get("checks", {}).items():
        lines.append(f"{'PASS' if ok else 'FAIL'}  {k}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer requests and tokens (a smoke run)")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-hf-batch", action="store_true", help="the HF peer at batch 1 only (its batch runs are slow)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile-dir", default=None)
    args = ap.parse_args()
    global PROFILE_DIR
    PROFILE_DIR = args.profile_dir
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "checks": {}}

    def stage(label, fn, *a):
        t0 = time.perf_counter()
        try:
            fn(*a)
        except Exception as e:  # noqa: BLE001 - one failed stage must not lose the others' figures
            import traceback

            traceback.print_exc()
            report["checks"][f"{label} ran"] = False
            report.setdefault("errors", {})[label] = repr(e)
        print(f"[{time.perf_counter() - t0:6.1f}s] {label}", flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1, default=str)

    stage("kernel checks", check_kernels, report)
    stage("greedy check", check_greedy, report, args.quick)
    stage("ours 1B", bench_ours, "Llama-3.2-1B", report, args.quick, True)
    if not args.skip_hf:
        stage("HF 1B batch 1", bench_hf, "Llama-3.2-1B", report, args.quick, 1, 32, "hf_batch1_tok_s")
        if not args.skip_hf_batch:
            stage("HF 1B batch", bench_hf, "Llama-3.2-1B", report, args.quick, 64 if args.quick else 256, 16,
                  "hf_batch_tok_s")
    if not args.skip_8b:
        stage("ours 8B", bench_ours, "Llama-3.1-8B", report, args.quick, False)
        if not args.skip_hf:
            stage("HF 8B batch 1", bench_hf, "Llama-3.1-8B", report, args.quick, 1, 32, "hf_batch1_tok_s")
            if not args.skip_hf_batch:
                stage("HF 8B batch", bench_hf, "Llama-3.1-8B", report, args.quick, 64 if args.quick else 128, 16,
                      "hf_batch_tok_s")
    for name in SHAPES:
        for line in report.get(name, {}).get("profile_top_b1", []):
            print(line)
    print(table(report))


if __name__ == "__main__":
    main()
