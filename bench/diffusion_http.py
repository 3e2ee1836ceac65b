#!/usr/bin/env python
"""Diffusion LMs (LLaDA) on one GPU, through HTTP: the figures of issue 13's device table, in one command.

Random weights of LLaDA-8B's shape in bf16; the plain reference loop (LLaDA's generate.py: a full forward of
every sequence and the LM head over every position, per step) runs in this process on the same weights, in the
same run. With random weights threshold decoding's speed means nothing, so every figure is at fixed steps.

  (a) 1 request, 128 new tokens, steps 128, block 32: tokens/s
  (b) 16 concurrent requests through HTTP (a real `tinkerbell serve` of the checkpoint), steps 128: requests/s
  (c) the same with steps 32 (4 tokens per step): requests/s
  (d) a block step at batch 16 (16 x 32 tokens over a 192-token dual cache): achieved TFLOP/s vs the bf16 peak
  (e) `serve --dp 2` with both replicas on ONE GPU (--dp2-devices 0,1 puts them on two) vs `--dp 1`: requests/s
Correctness: an exact check in float32 (LLaDA-8B widths, 2 layers, same device): our sampler's `basic`
algorithm gives the reference's tokens at temperature 0; in bf16 the share of identical tokens is reported
(bf16 logits tie often over a 126k vocabulary, so a different GEMM shape may flip a near-tie).

The checkpoint is written once in the published format (config.json, safetensors under the real names) with a
word-level tokenizer covering the whole vocabulary, token i spelled "<i>", so the served text gives back the
exact token ids. It is reused by the dp 1 and dp 2 servers.

    python bench/diffusion_http.py                         # one H100: ~6 min, most of it writing/loading 16 GB
    python bench/diffusion_http.py --quick                 # (a)-(d) only, basic and dual_cache: ~3-4 min
    python bench/diffusion_http.py --small --device cpu    # smoke run on a tiny shape (< 1 min)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.diffusion_speed import LLADA_8B, SMALL, build, reference_generate, timed  # noqa: E402
from tinkerbell.engine.diffusion import DiffusionSampler  # noqa: E402
from tinkerbell.engine.types import SampleJob  # noqa: E402

ALGOS = ("basic", "prefix_cache", "dual_cache")
PEAK_TFLOPS = 760.0  # the measured bf16 matmul peak of an H100 SXM (issue 13); this run measures its own too
TOKEN = re.compile(r"<(\d+)>")
MASK_TOKEN = "<|mdm_mask|>"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- in process


def ours_tokens(sampler: DiffusionSampler, prompts: list[list[int]], steps: int, gen: int, block: int, algo: str,
                step_times: list[float] | None = None) -> list[list[int]]:
    futs: list[Future] = []
    for p in prompts:
        futs.append(Future())
        sampler.add_request(SampleJob(prompt=p, max_tokens=gen, temperature=0.0, steps=steps, block_length=block,
                                      generation_algorithm=algo, stop_at_eos=False), futs[-1])
    while sampler.has_work():
        if step_times is None:
            sampler.step()
        else:
            step_times.append(timed(sampler.step, sampler.device.type))
    return [f.result().sequences[0].tokens for f in futs]


def matching(a: list[list[int]], b: list[list[int]]) -> tuple[int, int, int]:
    """(identical sequences, identical tokens, tokens)."""
    seqs = sum(x == y for x, y in zip(a, b))
    toks = sum(p == q for x, y in zip(a, b) for p, q in zip(x, y))
    return seqs, toks, sum(len(x) for x in a)


def exact_check(shape: dict, device: str, args: argparse.Namespace) -> tuple[bool, bool, float]:
    """float32, the shape's widths with 2 layers: (our `basic` == the reference loop on the same fused forward,
    token for token: the algorithm; == the reference loop on the plain forward (the modules as written); the
    largest |logit| difference of the fused and plain forwards over the prompts). On the GPU the fused forward's
    Triton norms may round a float32 last bit differently, which can flip a rare near-tie."""
    model = build({**shape, "n_layers": 2}, device, torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, shape["mask_token_id"], (2, args.prompt_len), generator=g).to(device)
    # The sampler fuses q/k/v and gate/up on the GPU: made first, so the reference runs the same matmuls.
    sampler = DiffusionSampler(model, torch.device(device), torch.float32, eos_token_ids=[], decode=lambda i: "",
                               max_context=4096, batch_size=16)
    ref = reference_generate(model, prompts, args.gen, args.gen, args.block, plain=False)
    ref_plain = reference_generate(model, prompts, args.gen, args.gen, args.block, plain=True)
    ours = ours_tokens(sampler, prompts.tolist(), args.gen, args.gen, args.block, "basic")
    n = prompts.shape[1]
    with torch.inference_mode():
        pos, ones = torch.arange(n, device=device).expand(2, n), torch.ones(2, n, dtype=torch.bool, device=device)
        diff = (model(prompts, pos, ones)[0] - model(prompts, pos, ones, plain=True)[0]).abs().max().item()
    del model, sampler
    return (ours == ref[:, args.prompt_len:].tolist(), ours == ref_plain[:, args.prompt_len:].tolist(), diff)


def flops_per_token(cfg: Any, context: int) -> float:
    """Forward FLOPs of one token attending over `context` keys, its LM-head row included."""
    d, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    linear = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * inter
    attn = 2 * context * cfg.num_heads * hd  # QK^T and AV, 2 FLOPs per MAC counted below
    return 2.0 * (cfg.num_layers * (linear + attn) + cfg.vocab_size * d)


def matmul_peak(device: str) -> float | None:
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    best = min(timed(lambda: [a @ b for _ in range(10)], device) for _ in range(5)) / 10
    return 2 * 8192 ** 3 / best / 1e12


def block_step(model: Any, sampler: DiffusionSampler, prompts: list[list[int]], args: argparse.Namespace,
               device: str) -> dict[str, float]:
    """(d): the plain torch forward of a dual-cache block step at batch 16 (the modules as written, the cached
    context concatenated per layer), our fused forward alone (its key buffer with room, as the sampler passes it,
    no graph), and our sampler's median step (graphs as configured: on by default on CUDA)."""
    cfg = model.cfg
    b, blk, n = len(prompts), args.block, args.prompt_len + args.gen
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, cfg.mask_token_id, (b, blk), device=device)
    pos = torch.arange(args.prompt_len, args.prompt_len + blk, device=device).expand(b, blk)
    past = torch.randn(cfg.num_layers, 2, b, n - blk, cfg.num_kv_heads, cfg.head_dim, device=device, dtype=dtype)
    key_mask = torch.ones(b, n, dtype=torch.bool, device=device)
    with torch.inference_mode():
        for _ in range(3):
            model(ids, pos, key_mask, past=past, plain=True)
        plain = statistics.median(timed(lambda: model(ids, pos, key_mask, past=past, plain=True), device)
                                  for _ in range(10))
        room = torch.cat([past, torch.zeros_like(past[:, :, :, :blk])], dim=3)
        del past
        for _ in range(3):
            model(ids, pos, key_mask, past=room)
        fused = statistics.median(timed(lambda: model(ids, pos, key_mask, past=room), device) for _ in range(10))
    del room
    times: list[float] = []
    ours_tokens(sampler, prompts, args.gen, args.gen, args.block, "dual_cache", step_times=times)
    ours = statistics.median(times)  # 1 step in steps/blocks refreshes the cache (a full forward): not the median
    fewer: list[float] = []  # (c)'s settings in process: the figure HTTP should approach
    ours_tokens(sampler, prompts, args.gen // 4, args.gen, args.block, "dual_cache", step_times=fewer)
    flops = b * blk * flops_per_token(cfg, n)
    return {"plain_ms": plain * 1e3, "ours_ms": ours * 1e3, "plain_tflops": flops / plain / 1e12,
            "ours_tflops": flops / ours / 1e12, "ours_run_s": sum(times), "ours_run_c_s": sum(fewer),
            "fused_ms": fused * 1e3, "fused_tflops": flops / fused / 1e12}


def graphs_check(model: Any, prompts: list[list[int]], args: argparse.Namespace, device: str) -> dict[str, Any]:
    """dual_cache with CUDA graphs (diffusion_graphs.py) vs without, in process: the block step at batch n and
    one request's tokens/s, and whether the tokens are identical."""
    out: dict[str, Any] = {}
    tokens = {}
    for graphs in (False, True):
        sampler = DiffusionSampler(model, torch.device(device), next(model.parameters()).dtype, eos_token_ids=[],
                                   decode=lambda i: "", max_context=4096, batch_size=len(prompts),
                                   cuda_graphs=graphs)
        times: list[float] = []
        tokens[graphs] = ours_tokens(sampler, prompts, args.gen, args.gen, args.block, "dual_cache", times)
        out[f"step_ms_{graphs}"] = statistics.median(times) * 1e3
        ours_tokens(sampler, prompts[:1], args.gen, args.gen, args.block, "dual_cache")  # graphs of batch 1
        t = timed(lambda: ours_tokens(sampler, prompts[:1], args.gen, args.gen, args.block, "dual_cache"), device)
        out[f"one_tok_s_{graphs}"] = args.gen / t
        out[f"replays_{graphs}"] = sampler.stats()["cuda_graph_replays"]
    out["identical"] = tokens[False] == tokens[True]
    flops = len(prompts) * args.block * flops_per_token(model.cfg, args.prompt_len + args.gen)
    out["tflops"] = flops / (out["step_ms_True"] / 1e3) / 1e12
    return out


# ------------------------------------------------------------------------------------------- checkpoint


def write_checkpoint(model: Any, shape: dict, out: Path) -> None:
    """The published LLaDA layout: config.json, safetensors under the real names (4 shards, written in parallel),
    and a word-level tokenizer with one token "<i>" per id so text maps back to ids exactly."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = {f"<{i}>": i for i in range(shape["embedding_size"])}
    del vocab[f"<{shape['mask_token_id']}>"]
    vocab[MASK_TOKEN] = shape["mask_token_id"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, mask_token=MASK_TOKEN).save_pretrained(str(out))
    config = {"architectures": ["LLaDAModelLM"], **shape, "block_type": "llama", "activation_type": "silu",
              "layer_norm_type": "rms", "rope": True, "include_bias": False}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    # A copy gives each tensor its own storage (fused q/k/v views would otherwise share one, which safetensors
    # refuses). Weights keep the bench's dtype (bf16 on the GPU, float32 in the CPU smoke run).
    names = [k for k in model.state_dict()]
    shards = [names[i::4] for i in range(4)]
    state = model.state_dict()

    def one(i: int) -> None:
        part = {k: state[k].detach().to("cpu", copy=True).contiguous() for k in shards[i]}
        save_file(part, str(out / f"model-{i + 1:05d}-of-00004.safetensors"), metadata={"format": "pt"})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(4)))


# ------------------------------------------------------------------------------------------- HTTP


async def wave(url: str, key: str, prompts: list[list[int]], body: dict[str, Any]) -> tuple[float, list[list[int]]]:
    """All prompts at once as /v1/completions requests; (seconds until the last answer, tokens of each)."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=httpx.Limits(max_connections=256),
                                 trust_env=False) as client:
        async def one(p: list[int]) -> list[int]:
            r = await client.post(url + "/v1/completions", headers=headers, json={**body, "prompt": p})
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            return [int(t) for t in TOKEN.findall(r.json()["choices"][0]["text"])]

        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - t0, list(out)


COUNTERS = ("steps", "forwards", "forward_tokens", "cuda_graph_replays", "cuda_graph_captures")


def sampler_counters(url: str, key: str) -> dict[str, float]:
    """The diffusion sampler's counters from the server's /stats (summed over replicas behind a router)."""
    found: dict[str, float] = dict.fromkeys(COUNTERS, 0.0)

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            if "forwards" in v and "steps" in v:
                for k in COUNTERS:
                    found[k] += float(v.get(k) or 0)
                return
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(httpx.get(url + "/stats", headers={"Authorization": f"Bearer {key}"}, timeout=30).json())
    return found


def measured_wave(server: Any, prompts: list[list[int]], req: dict[str, Any],
                  seen: dict[str, str]) -> tuple[float, list[list[int]]]:
    """`wave`, plus what the sampler did meanwhile (steps, forwards per step, tokens per forward, graph replays
    and captures) recorded under the wave's name in `seen`: why HTTP differs from the in-process figure."""
    before = sampler_counters(server.url, server.api_key)
    t, toks = asyncio.run(wave(server.url, server.api_key, prompts, req))
    d = {k: v - before[k] for k, v in sampler_counters(server.url, server.api_key).items()}
    steps = max(d["steps"], 1.0)
    seen[f"{req['generation_algorithm']} x{len(prompts)} steps {req['steps']}"] = (
        f"{t:.2f}s, {d['steps']:.0f} steps ({1000 * t / steps:.1f} ms each), {d['forwards'] / steps:.2f} forwards "
        f"a step, {d['forward_tokens'] / max(d['forwards'], 1):.0f} tokens a forward, "
        f"{d['cuda_graph_replays']:.0f} replays, {d['cuda_graph_captures']:.0f} captures")
    return t, toks


def body(model: str, args: argparse.Namespace, steps: int, algo: str) -> dict[str, Any]:
    return {"model": model, "max_tokens": args.gen, "temperature": 0, "ignore_eos": True, "steps": steps,
            "block_length": args.block, "generation_algorithm": algo}


def start_server(ckpt: Path, work: Path, dp: int, devices: str | None, device: str) -> Any:
    from tinkerbell.bench.server import ServerLauncher

    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else (devices or saved or "0")
    try:
        launcher = ServerLauncher(str(ckpt), work, extra=["--algorithm", "dual_cache", "--batch-size", "16",
                                                          "--max-wait-time", "0",
                                                          "--health-check-interval", "1"])
        server = launcher.start(dp=dp, name=f"dp{dp}")
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    deadline = time.monotonic() + 300
    while dp > 1:  # the router answers once one replica is up: wait for all
        healthy = httpx.get(server.url + "/stats", timeout=5).json().get("healthy_workers")
        if healthy == dp:
            break
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"only {healthy} of {dp} replicas became healthy in 300 s (see the replica logs)")
        time.sleep(0.5)
    return server


def served_model(server: Any) -> str:
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {server.api_key}"}, timeout=30)
    return r.json()["data"][0]["id"]


# ------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="a tiny shape (smoke test)")
    ap.add_argument("--prompt-len", type=int, help="prompt tokens (default 64; --small: 16)")
    ap.add_argument("--gen", type=int, help="new tokens, = the steps of (a) and (b) (default 128; --small: 32)")
    ap.add_argument("--block", type=int, help="block length (default 32; --small: 8)")
    ap.add_argument("--concurrency", type=int, help="concurrent requests of (b), (c), (e) (default 16; --small: 4)")
    ap.add_argument("--checkpoint", type=Path, help="where to write the checkpoint (default: a temp dir, removed)")
    ap.add_argument("--dp2-devices", default=None, help="CUDA_VISIBLE_DEVICES of the dp 2 server (default: the "
                                                        "first GPU only: both replicas share it)")
    ap.add_argument("--algorithms", default=None, help="our algorithms to measure over HTTP (default: all three; "
                                                       "--quick: basic,dual_cache)")
    ap.add_argument("--quick", action="store_true", help="only (a)-(d): no dp 2 server, no in-process basic run, "
                                                         "no graphs on/off comparison (~3-4 min on one H100)")
    args = ap.parse_args()
    if args.algorithms is None:
        args.algorithms = "basic,dual_cache" if args.quick else ",".join(ALGOS)
    for name, full, small in (("prompt_len", 64, 16), ("gen", 128, 32), ("block", 32, 8), ("concurrency", 16, 4)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else full)
    t_start = time.perf_counter()
    dev, shape = args.device, SMALL if args.small else LLADA_8B
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    algos = [a for a in args.algorithms.split(",") if a]
    n = args.concurrency
    notes: list[str] = []

    exact, exact_plain, fused_diff = exact_check(shape, dev, args)
    log(f"exact check (float32, 2 layers): ours {'==' if exact else '!='} reference loop (same forward), "
        f"{'==' if exact_plain else '!='} reference loop on the plain forward; max |fused - plain| logit "
        f"{fused_diff:.2e}")
    model = build(shape, dev, dtype)
    model.fuse_projections()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, shape["mask_token_id"], (n, args.prompt_len), generator=g).to(dev)
    ref: dict[str, float] = {}
    reference_generate(model, prompts[:2], 8, args.block, args.block)  # warm-up
    ref["a"] = args.gen / timed(lambda: reference_generate(model, prompts[:1], args.gen, args.gen, args.block), dev)
    out: list[Any] = []
    ref["b"] = n / timed(lambda: out.append(reference_generate(model, prompts, args.gen, args.gen, args.block)), dev)
    ref_tokens = out[0][:, args.prompt_len:].tolist()
    ref["c"] = n / timed(lambda: reference_generate(model, prompts, args.gen // 4, args.gen, args.block), dev)
    log(f"reference loop: {ref}")
    sampler = DiffusionSampler(model, torch.device(dev), dtype, eos_token_ids=[], decode=lambda i: "",
                               max_context=4096, batch_size=n)
    got: list[list[list[int]]] = []
    t_basic, inproc = None, None
    if not args.quick:
        t_basic = timed(lambda: got.append(ours_tokens(sampler, prompts.tolist(), args.gen, args.gen, args.block,
                                                       "basic")), dev)
        inproc = matching(got[0], ref_tokens)
    else:  # warm the sampler's kernels and graphs of batch n before (d) times its steps
        ours_tokens(sampler, prompts.tolist(), args.gen // 8, args.gen, args.block, "dual_cache")
    step = block_step(model, sampler, prompts.tolist(), args, dev)
    peak = matmul_peak(dev)
    graphs = graphs_check(model, prompts.tolist(), args, dev) if dev == "cuda" and not args.quick else None
    log(f"CUDA graphs check: {graphs}")
    log(f"block step: {step}; measured bf16 matmul peak {peak}")

    ckpt = args.checkpoint or Path(tempfile.mkdtemp(prefix="llada-bench-"))
    t0 = time.perf_counter()
    write_checkpoint(model, shape, ckpt)
    t_write = time.perf_counter() - t0
    log(f"wrote the checkpoint to {ckpt} in {t_write:.1f}s")
    del model, sampler, out
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()

    work = Path(tempfile.mkdtemp(prefix="llada-bench-work-"))
    http: dict[tuple[str, str], float] = {}
    served_match = None
    dp_rps: dict[int, float] = {}
    load_s: dict[int, float] = {}
    waves: dict[str, str] = {}
    try:
        for dp in (1,) if args.quick else (1, 2):
            t0 = time.perf_counter()
            try:
                server = start_server(ckpt, work, dp, args.dp2_devices if dp == 2 else None, dev)
            except Exception as e:  # noqa: BLE001 - the table still shows what was measured
                notes.append(f"serve --dp {dp} failed to start: {e}")
                log(notes[-1])
                continue
            load_s[dp] = time.perf_counter() - t0
            log(f"serve --dp {dp} up in {load_s[dp]:.1f}s")
            try:
                name = served_model(server)
                ps = prompts.tolist()
                for algo in algos if dp == 1 else ["dual_cache"]:
                    asyncio.run(wave(server.url, server.api_key, ps[:2], {**body(name, args, 8, algo),
                                                                          "max_tokens": args.block}))  # warm-up
                if dp == 1:
                    for algo in algos:
                        t, _ = measured_wave(server, ps[:1], body(name, args, args.gen, algo), waves)
                        http[("a", algo)] = args.gen / t
                        t, toks = measured_wave(server, ps, body(name, args, args.gen, algo), waves)
                        http[("b", algo)] = n / t
                        if algo == "basic":
                            served_match = matching(toks, ref_tokens)
                        t, _ = measured_wave(server, ps, body(name, args, args.gen // 4, algo), waves)
                        http[("c", algo)] = n / t
                        log(f"HTTP {algo}: a {http[('a', algo)]:.1f} tok/s, b {http[('b', algo)]:.2f} req/s, "
                            f"c {http[('c', algo)]:.2f} req/s")
                t, _ = asyncio.run(wave(server.url, server.api_key, ps, body(name, args, args.gen // 4, "dual_cache")))
                dp_rps[dp] = n / t
                log(f"dp {dp}: {dp_rps[dp]:.2f} req/s")
            except Exception as e:  # noqa: BLE001 - the table still shows what was measured
                notes.append(f"dp {dp} HTTP run failed: {type(e).__name__}: {e}")
                log(notes[-1])
            finally:
                server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.checkpoint is None:
            shutil.rmtree(ckpt, ignore_errors=True)

    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    dp2_where = f"CUDA_VISIBLE_DEVICES={args.dp2_devices}" if args.dp2_devices else "both replicas on ONE GPU"
    print(f"\n## Diffusion LMs: {gpu}, torch {torch.__version__}, {'tiny' if args.small else 'LLaDA-8B'} shape, "
          f"random weights, {dtype}, "
          f"prompt {args.prompt_len}, {args.gen} new tokens, block {args.block}, temperature 0, fixed steps\n")
    cols = " | ".join(algos)
    print(f"| figure | reference (plain loop, same run) | ours: {cols} | target |")
    print("|---|---|" + "---|" * len(algos) + "---|")
    targets = {"a": "≥ 150", "b": "≥ 6", "c": "≥ 16"}
    labels = {"a": f"(a) 1 request, steps {args.gen}: tokens/s (HTTP)",
              "b": f"(b) {n} concurrent through HTTP, steps {args.gen}: requests/s",
              "c": f"(c) {n} concurrent through HTTP, steps {args.gen // 4}: requests/s"}
    for k in "abc":
        fmt = "{:.1f}" if k == "a" else "{:.2f}"
        vals = " | ".join(fmt.format(http[(k, a)]) if (k, a) in http else "-" for a in algos)
        print(f"| {labels[k]} | {fmt.format(ref[k])} | {vals} | {targets[k]} |")  # "-": not measured (see notes)
    pct = lambda x: f"{x:.0f} TFLOP/s = {100 * x / PEAK_TFLOPS:.0f}% of {PEAK_TFLOPS:.0f}"  # noqa: E731
    # Our block step is the sampler's dual_cache step (measured in process whatever --algorithms says).
    dual = ["-"] * (len(algos) - 1) + [f"dual_cache step: {pct(step['ours_tflops'])} ({step['ours_ms']:.1f} ms); "
                                       f"the fused forward alone: {pct(step['fused_tflops'])} "
                                       f"({step['fused_ms']:.1f} ms)"]
    print(f"| (d) block step, batch {n} x {args.block} tokens over {args.prompt_len + args.gen} keys: TFLOP/s | "
          f"plain torch forward: {pct(step['plain_tflops'])} ({step['plain_ms']:.1f} ms) | {' | '.join(dual)} "
          f"| ≥ 65% |")
    ratio = dp_rps[2] / dp_rps[1] if dp_rps.get(1) and dp_rps.get(2) else float("nan")
    if not args.quick:  # --quick runs no dp 2 server
        print(f"| (e) dp 2 vs dp 1, {n} concurrent, steps {args.gen // 4}, dual_cache ({dp2_where}): requests/s | "
              f"dp 1: {dp_rps.get(1, 0):.2f} | dp 2: {dp_rps.get(2, 0):.2f} = {ratio:.2f}x |"
              + " |" * (len(algos) - 1) + " ≥ 1.9x on 2 GPUs |")
    print()
    print(f"- correctness, exact (float32, {'tiny' if args.small else 'LLaDA-8B'} widths, 2 layers, {dev}): "
          f"ours basic == reference tokens: {'yes' if exact else 'NO'} (the reference loop on the same fused "
          f"forward); == the reference loop on the plain forward: {'yes' if exact_plain else 'no'}; "
          f"max |fused - plain| logit {fused_diff:.1e}")
    if inproc is not None:
        s, t, tot = inproc
        print(f"- {dtype} same model, in process, basic vs reference, {n} prompts: {s}/{n} sequences, {t}/{tot} "
              "tokens identical (the reference loop runs the plain forward)")
    if served_match is not None:
        s, t, tot = served_match
        print(f"- {dtype} through HTTP (dp 1), basic vs reference: {s}/{n} sequences, {t}/{tot} tokens identical "
              "(the reference loop runs the plain forward)")
    basic_rps = f"basic {n / t_basic:.2f} req/s, " if t_basic else ""
    print(f"- in process (no HTTP), {n} requests at once, steps {args.gen}: {basic_rps}"
          f"dual_cache {n / step['ours_run_s']:.2f} req/s; steps {args.gen // 4}: dual_cache "
          f"{n / step['ours_run_c_s']:.2f} req/s")
    if graphs is not None:
        print(f"- CUDA graphs off -> on (TINKERBELL_DIFFUSION_CUDA_GRAPHS, default on; this table's servers: "
              f"{os.environ.get('TINKERBELL_DIFFUSION_CUDA_GRAPHS', 'unset = on')}), in process, dual_cache: "
              f"block step at "
              f"batch {n} {graphs['step_ms_False']:.1f} -> {graphs['step_ms_True']:.1f} ms "
              f"({graphs['tflops']:.0f} TFLOP/s = {100 * graphs['tflops'] / PEAK_TFLOPS:.0f}%); 1 request "
              f"{graphs['one_tok_s_False']:.0f} -> {graphs['one_tok_s_True']:.0f} tok/s; "
              f"{graphs['replays_True']} replays; tokens identical: {'yes' if graphs['identical'] else 'NO'}")
    if peak is not None:
        print(f"- bf16 matmul peak measured in this run (8192^3): {peak:.0f} TFLOP/s")
    print(f"- checkpoint write {t_write:.0f}s; server start dp 1 {load_s.get(1, 0):.0f}s, dp 2 {load_s.get(2, 0):.0f}s;"
          f" whole run {time.perf_counter() - t_start:.0f}s")
    for name, what in waves.items():
        print(f"- HTTP wave {name} (dp 1), the sampler meanwhile: {what}")
    for note in notes:
        print(f"- {note}")
    return 0 if exact and not notes else 1


if __name__ == "__main__":
    sys.exit(main())
