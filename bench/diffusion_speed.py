#!/usr/bin/env python
"""Diffusion-LM generation speed: the plain reference loop vs DiffusionSampler, same weights, same run.

Random weights of LLaDA-8B's shape in bf16 (with random weights threshold decoding's speed means nothing, so
every figure is at fixed steps). The reference is LLaDA's generate.py algorithm in plain torch: a full forward
of every sequence, LM head over every position, per step. Ours batches requests with their own parameters.

    python bench/diffusion_speed.py                 # one GPU, LLaDA-8B shape
    python bench/diffusion_speed.py --small --device cpu   # smoke run on a tiny shape
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import Future

import torch

from tinkerbell.engine.diffusion import DiffusionSampler, transfer_schedule
from tinkerbell.engine.models.config import ModelConfig
from tinkerbell.engine.models.llada import new_llada
from tinkerbell.engine.types import SampleJob

LLADA_8B = dict(model_type="llada", d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                vocab_size=126464, embedding_size=126464, rope_theta=500000.0, rms_norm_eps=1e-5,
                mask_token_id=126336, eos_token_id=126081, max_sequence_length=4096, weight_tying=False)
SMALL = {**LLADA_8B, "d_model": 128, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 256,
         "vocab_size": 1024, "embedding_size": 1024, "mask_token_id": 1000, "eos_token_id": 1001}


def build(shape: dict, device: str, dtype: torch.dtype):
    cfg = ModelConfig.from_hf_dict(shape)
    model = new_llada(cfg, device, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    return model.eval()


@torch.no_grad()
def reference_generate(model, prompts: torch.Tensor, steps: int, gen: int, block: int,
                       plain: bool = True) -> torch.Tensor:
    """LLaDA's generate.py at temperature 0, low-confidence remasking, a batch of equal-length prompts; on the
    model's plain forward (the modules as written) unless `plain` is False (then the sampler's fused forward)."""
    mask_id = model.cfg.mask_token_id
    b, p = prompts.shape
    x = torch.full((b, p + gen), mask_id, dtype=torch.long, device=prompts.device)
    x[:, :p] = prompts
    n = x.shape[1]
    pos = torch.arange(n, device=x.device).expand(b, n)
    key_mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
    spb = steps // (gen // block)
    for k in range(gen // block):
        schedule = transfer_schedule(block, spb)
        for i in range(spb):
            mask_index = x == mask_id
            logits = model(x, pos, key_mask, plain=plain)[0].view(b, n, -1)
            x0 = logits.argmax(-1)
            x0_p = torch.softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, p + (k + 1) * block:] = -float("inf")
            conf = torch.where(mask_index, x0_p, -float("inf"))
            sel = conf.topk(schedule[i], dim=-1).indices
            x.scatter_(1, sel, x0.gather(1, sel))
    return x


def ours(sampler: DiffusionSampler, prompts: list[list[int]], steps: int, gen: int, block: int, algo: str) -> None:
    futs = []
    for prompt in prompts:
        futs.append(Future())
        sampler.add_request(SampleJob(prompt=prompt, max_tokens=gen, temperature=0.0, steps=steps, block_length=block,
                                      generation_algorithm=algo, stop_at_eos=False), futs[-1])
    while sampler.has_work():
        sampler.step()
    for f in futs:
        f.result()


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="a tiny shape (smoke test)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--fuse", action="store_true", default=True)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build(SMALL if args.small else LLADA_8B, args.device, dtype)
    if args.fuse:
        model.fuse_projections()
    vocab = model.cfg.mask_token_id
    g = torch.Generator().manual_seed(0)

    def prompts(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (n, args.prompt_len), generator=g).to(args.device)

    sampler = DiffusionSampler(model, torch.device(args.device), dtype, eos_token_ids=[], decode=lambda ids: "",
                               max_context=4096, batch_size=64)
    rows = []
    scenarios = [("1 request, steps 128", 1, 128), ("16 concurrent, steps 128", 16, 128),
                 ("16 concurrent, steps 32", 16, 32)]
    ours(sampler, prompts(2).tolist(), 8, args.block, args.block, "basic")  # warm-up
    for name, n, steps in scenarios:
        batch = prompts(n)
        t_ref = timed(lambda: reference_generate(model, batch, steps, args.gen, args.block), args.device)
        row = [name, n * args.gen / t_ref, n / t_ref]
        for algo in ("basic", "prefix_cache", "dual_cache"):
            t = timed(lambda: ours(sampler, batch.tolist(), steps, args.gen, args.block, algo), args.device)
            row += [n * args.gen / t, n / t]
        rows.append(row)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{dev}, {'tiny' if args.small else 'LLaDA-8B'} shape, {dtype}, prompt {args.prompt_len}, "
          f"{args.gen} new tokens, block {args.block}, temperature 0, fixed steps (random weights)\n")
    print("| scenario | reference tok/s | req/s | basic tok/s | req/s | prefix_cache tok/s | req/s | "
          "dual_cache tok/s | req/s |")
    print("|---|" + "---|" * 8)
    for r in rows:
        print(f"| {r[0]} | " + " | ".join(f"{v:.1f}" if i % 2 == 0 else f"{v:.2f}" for i, v in enumerate(r[1:])) + " |")


if __name__ == "__main__":
    main()
