"""LoRA training speed of our Trainer against HF + PEFT (and PEFT + Liger kernels when importable), one GPU.

Random-weight models of real shapes are built in memory (no download). For each model: LoRA r32 on every
linear layer and the unembedding, cross-entropy on 8 sequences of 1024 tokens, forward + backward + AdamW step
per iteration; tokens/s, MFU (4 · N_base · tokens / time / 989 TFLOP/s: forward plus input gradients through
the frozen base), peak GPU memory. Also: 8 runs × 1×1024 packed in one step vs 1 run × 8×1024, and the
train→sampler handoff (`Trainer.snapshot` + register + load into a sampler LoRA slot).

Correctness runs first, in the same process: on a 2-layer slice of Llama-3.2-1B's shapes in float32 our
per-token logprobs and LoRA gradients equal PEFT's; the packed 3-run step equals each run alone; the fused
AdamW over runs equals the per-run steps. The script exits non-zero if a check fails.

    PYTHONPATH=. python3 bench/training_speed.py            # on the GPU machine (~5 minutes)
    PYTHONPATH=. python3 bench/training_speed.py --smoke    # tiny shapes, CPU, checks only the plumbing
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from tinkerbell.engine import training_lora
from tinkerbell.engine.lora import LoraSpec
from tinkerbell.engine.lora_slots import LoraSlots
from tinkerbell.engine.models.config import ModelConfig
from tinkerbell.engine.models.llama import CausalLM
from tinkerbell.engine.training import Trainer
from tinkerbell.engine.types import AdamParams, TrainDatum

PEAK_FLOPS = 989e12  # H100 SXM dense bf16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                         tie_word_embeddings=True),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                         tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 tie_word_embeddings=True),
}
HP = AdamParams(learning_rate=1e-4)


def model_config(name: str, vocab: int = 128256, layers: int | None = None) -> ModelConfig:
    s = dict(SHAPES[name])
    if layers is not None:
        s["num_layers"] = layers
    return ModelConfig(arch="llama", vocab_size=vocab, head_dim=s["hidden_size"] // s["num_heads"], rms_norm_eps=1e-5,
                       rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072,
                       attention_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, **s)


def build_ours(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    with torch.device(device):
        model = CausalLM(cfg).to(dtype)
    model.inv_freq = cfg.inv_freq().to(device)
    model.requires_grad_(False)
    model.fuse_projections()  # as the sampler leaves it
    return model


def hf_config(cfg: ModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps,
                       max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
                       rope_parameters={"rope_theta": cfg.rope_theta, **LLAMA3_ROPE}, attention_bias=False)


def build_peft(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, rank: int, lm_head: bool,
               state: dict | None = None):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with torch.device(device):
        hf = LlamaForCausalLM(hf_config(cfg)).to(dtype)
    if state is not None:
        hf.load_state_dict(state, strict=False)
    targets = TARGETS + (["lm_head"] if lm_head else [])
    return get_peft_model(hf, LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0, target_modules=targets))


def datum(tokens: np.ndarray) -> TrainDatum:
    return TrainDatum(tokens[:-1], {"target_tokens": tokens[1:], "weights": np.ones(len(tokens) - 1, np.float32)})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")


def base_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ------------------------------------------------------------------------------------------------ checks


def check_against_peft(device: torch.device, vocab: int) -> dict:
    """float32, 2 layers of 1B shapes: our logprobs and LoRA gradients vs PEFT's on the same weights."""
    name = "tiny" if device.type == "cpu" else "Llama-3.2-1B"
    cfg = model_config(name, vocab=vocab, layers=2)
    model = build_ours(cfg, device, torch.float32)
    trainer = Trainer(model, device)
    trainer.create("r", LoraSpec(rank=8), seed=0)
    w = trainer._runs["r"].weights
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k in w.b:
            w.b[k].copy_(torch.randn(w.b[k].shape, generator=g) * 0.02)
    rng = np.random.default_rng(0)
    data = [datum(rng.integers(0, vocab, n + 1)) for n in (96, 160, 33)]
    ours = trainer.forward_backward("r", data, "cross_entropy", {}, False)

    peft_model = build_peft(cfg, device, torch.float32, 8, True, state=model.state_dict())
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if ".lora_" in pname:
                key = pname.removeprefix("base_model.model.").split(".lora_")[0]
                p.copy_((w.a if ".lora_A." in pname else w.b)[key])
    lp_diff, loss = 0.0, 0.0
    for d, out in zip(data, ours.outputs):
        logits = peft_model(input_ids=torch.as_tensor(d.tokens, device=device)[None]).logits[0].float()
        lp = logits.log_softmax(-1).gather(-1, torch.as_tensor(d.inputs["target_tokens"], device=device)[:, None])[:, 0]
        lp_diff = max(lp_diff, (lp.detach().cpu() - torch.as_tensor(out["logprobs"])).abs().max().item())
        loss = loss - lp.sum()
    loss.backward()
    worst = 0.0
    for pname, p in peft_model.named_parameters():
        if ".lora_" in pname:
            key = pname.removeprefix("base_model.model.").split(".lora_")[0]
            ours_g = (w.a if ".lora_A." in pname else w.b)[key].grad
            worst = max(worst, ((ours_g - p.grad).norm() / (p.grad.norm() + 1e-12)).item())
    scale = float(np.mean([np.abs(o["logprobs"]).mean() for o in ours.outputs]))
    del peft_model, model, trainer
    # random weights give logprobs of order -100 (tied N(0, 1) embeddings), hence a relative bound
    return {"logprob_max_abs_diff": lp_diff, "logprob_mean_abs": scale, "grad_max_rel_err": worst,
            "ok": lp_diff <= 1e-4 * scale and worst <= 1e-4}


def check_packed_equals_alone(device: torch.device, vocab: int) -> dict:
    """float32: 3 runs in one packed step (ragged lengths) vs each alone: logprobs, gradients, weights after."""
    cfg = model_config("tiny" if device.type == "cpu" else "Llama-3.2-1B", vocab=vocab, layers=2)
    model = build_ours(cfg, device, torch.float32)
    packed, alone = Trainer(model, device), Trainer(model, device)
    rng = np.random.default_rng(3)
    reqs = [(f"r{i}", [datum(rng.integers(0, vocab, n + 1)) for n in lens])
            for i, lens in enumerate([(200, 17), (64,), (129, 300, 5)])]
    for t in (packed, alone):
        for i, (run, _) in enumerate(reqs):
            t.create(run, LoraSpec(rank=8), seed=i)
    res = packed.run_segments([packed.prepare(r, d, "cross_entropy", {}, False) for r, d in reqs])
    lp_diff, grad_err = 0.0, 0.0
    for (run, data), r in zip(reqs, res):
        ref = alone.forward_backward(run, data, "cross_entropy", {}, False)
        lp_diff = max(lp_diff, max(np.abs(x["logprobs"] - y["logprobs"]).max() for x, y in zip(r.outputs, ref.outputs)))
        for x, y in zip(packed._runs[run].weights.parameters(), alone._runs[run].weights.parameters()):
            grad_err = max(grad_err, ((x.grad - y.grad).norm() / (y.grad.norm() + 1e-12)).item())
    packed.optim_steps([(r, HP) for r, _ in reqs])
    for r, _ in reqs:
        alone.optim_step(r, HP)
    w_err = max(((x - y).norm() / y.norm()).item() for r, _ in reqs
                for x, y in zip(packed._runs[r].weights.parameters(), alone._runs[r].weights.parameters()))
    scale = float(np.mean([np.abs(o["logprobs"]).mean() for r in res for o in r.outputs]))
    return {"logprob_max_abs_diff": float(lp_diff), "logprob_mean_abs": scale, "grad_max_rel_err": grad_err,
            "weights_max_rel_err": w_err, "ok": lp_diff <= 1e-4 * scale and grad_err <= 1e-4 and w_err <= 1e-5}


# ------------------------------------------------------------------------------------------------ timing


def bench_ours(name: str, device: torch.device, vocab: int, seqs: int, seq_len: int, iters: int) -> dict:
    cfg = model_config(name, vocab=vocab)
    model = build_ours(cfg, device, torch.bfloat16)
    n_params = base_params(model)
    trainer = Trainer(model, device)
    rng = np.random.default_rng(0)
    batch = [datum(rng.integers(0, vocab, seq_len + 1)) for _ in range(seqs)]
    tokens = seqs * seq_len
    out: dict = {"params": n_params}
    plan = trainer.memory_plan()
    cap, ckpt = plan.microbatch_tokens(tokens)
    out["plan"] = {"microbatch_tokens": cap, "checkpointed": ckpt, "max_datum_tokens": plan.max_sequence_tokens,
                   "layer_bytes_per_token": round(plan.layer_bytes_per_token)}

    trainer.create("one", LoraSpec(rank=32), seed=0)

    def one_run() -> None:
        trainer.forward_backward("one", batch, "cross_entropy", {}, False)
        trainer.optim_step("one", HP)

    def measure(fn) -> tuple[dict, dict | None]:
        """Seconds per step, tokens/s, MFU and peak memory of `fn`; then a profile of one step (GPU only)."""
        peak_reset(device)
        t = timed(fn, device, warmup=2, iters=iters)
        row = {"s": t, "tok_s": tokens / t, "mfu": 4 * n_params * tokens / t / PEAK_FLOPS, "peak_gb": peak_gb(device)}
        return row, (profile(fn) if device.type == "cuda" else None)

    out["single"], prof = measure(one_run)
    if prof is not None:
        out["profile"] = prof

    runs = [f"t{i}" for i in range(seqs)]
    for i, r in enumerate(runs):
        trainer.create(r, LoraSpec(rank=32), seed=i)

    def many_runs() -> None:
        trainer.run_segments([trainer.prepare(r, [d], "cross_entropy", {}, False) for r, d in zip(runs, batch)])
        trainer.optim_steps([(r, HP) for r in runs])

    out["multi"], prof = measure(many_runs)
    if prof is not None:
        out["profile_multi"] = prof
    # The other way of running several adapters at once (every adapter on every row, a scale matrix zeroing the
    # products outside each run's rows), for the A/B behind training_lora.SEGMENTED.
    training_lora.SEGMENTED = False
    try:
        out["multi_stacked"], prof = measure(many_runs)
        if prof is not None:
            out["profile_multi_stacked"] = prof
    finally:
        training_lora.SEGMENTED = True

    slots = LoraSlots(cfg, max_loras=2, max_lora_rank=32, dtype=torch.bfloat16, device=device)

    def handoff() -> None:
        slots.register("one@x", trainer.snapshot("one"), copy=False)  # as the engine's handoff does
        slots.release(slots.acquire("one@x"))

    t_snap = timed(lambda: trainer.snapshot("one"), device, warmup=2, iters=20)
    out["handoff_ms"] = timed(handoff, device, warmup=2, iters=20) * 1e3
    out["snapshot_ms"] = t_snap * 1e3
    del trainer, model, slots
    return out


def profile(step) -> dict:
    """One profiled step: GPU-busy time against wall time (launch-bound or not) and the costliest kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    averages = prof.key_averages()
    events = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in events) / 1e6
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:20]
    # Where the host's time goes (a launch-bound step): ops by their own CPU time, profiler overhead included.
    host = sorted((e for e in averages if e.device_type == torch.autograd.DeviceType.CPU),
                  key=lambda e: -e.self_cpu_time_total)[:10]
    return {"wall_s": wall, "gpu_busy_s": busy, "kernels": sum(e.count for e in events),
            "top": [(e.key[:70], round(e.self_device_time_total / 1e3, 2), e.count) for e in top],
            "host_top": [(e.key[:70], round(e.self_cpu_time_total / 1e3, 2), e.count) for e in host]}


def bench_peft(name: str, device: torch.device, vocab: int, seqs: int, seq_len: int, iters: int,
               liger: bool) -> dict:
    cfg = model_config(name, vocab=vocab)
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    # Liger's fused linear cross-entropy reads lm_head.weight directly, bypassing a LoRA on it.
    model = build_peft(cfg, device, torch.bfloat16, 32, lm_head=not liger)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, vocab, (seqs, seq_len), device=device)
    tokens = seqs * seq_len

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out: dict = {"params": n_params, "lm_head_lora": not liger, "grad_ckpt": False}
    for ckpt in (False, True):
        try:
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
                out["grad_ckpt"] = True
            peak_reset(device)
            t = timed(step, device, warmup=2, iters=iters)
            out.update(s=t, tok_s=tokens / t, mfu=4 * n_params * tokens / t / PEAK_FLOPS, peak_gb=peak_gb(device))
            break
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            out["oom_without_ckpt"] = True
    del model, opt, params
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: plumbing only")
    ap.add_argument("--models", default="Llama-3.2-1B,Llama-3.1-8B")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    vocab, seqs, seq_len = (512, 4, 64) if args.smoke else (128256, 8, 1024)
    models = ["tiny"] if args.smoke else args.models.split(",")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (f"# training_speed  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  device: {dev_name}"
              f"  torch {torch.__version__}")
    print(header, flush=True)
    report: dict = {"device": dev_name, "torch": torch.__version__, "checks": {}, "models": {}}

    report["checks"]["vs_peft_fp32"] = check_against_peft(device, 512 if args.smoke else 32000)
    report["checks"]["packed_vs_alone_fp32"] = check_packed_equals_alone(device, 512 if args.smoke else 32000)
    print(json.dumps(report["checks"], indent=1), flush=True)
    peak_reset(device)

    for name in models:
        r: dict = {"ours": bench_ours(name, device, vocab, seqs, seq_len, args.iters)}
        print(name, "ours", json.dumps(r["ours"], indent=None), flush=True)
        peak_reset(device)
        if not args.no_peers:
            for peer, liger in (("peft", False), ("peft+liger", True)):
                if liger:
                    try:
                        import liger_kernel  # noqa: F401
                    except ImportError:
                        r[peer] = {"error": "liger-kernel not importable"}
                        continue
                try:
                    r[peer] = bench_peft(name, device, vocab, seqs, seq_len, args.iters, liger)
                except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
                    r[peer] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(name, peer, json.dumps(r[peer]), flush=True)
                peak_reset(device)
        report["models"][name] = r

    print("\n" + header)
    print(f"{'model':14} {'system':24} {'tokens/s':>9} {'MFU':>6} {'peak GB':>8}  notes")
    for name, r in report["models"].items():
        o = r["ours"]
        plan = o["plan"]
        note = f"microbatch {plan['microbatch_tokens']} tok, ckpt={plan['checkpointed']}"
        for label, m in (("ours 1 run x 8x1024", o["single"]), ("ours 8 runs x 1x1024", o["multi"]),
                         ("ours 8 runs, stacked LoRA", o["multi_stacked"])):
            print(f"{name:14} {label:24} {m['tok_s']:9.0f} {m['mfu']:6.1%} {m['peak_gb']:8.1f}  {note}")
        print(f"{name:14} {'8 runs / 1 run':24} {o['multi']['tok_s'] / o['single']['tok_s']:9.1%}")
        for key, label in (("profile", "profile 1 run"), ("profile_multi", "profile 8 runs"),
                           ("profile_multi_stacked", "profile 8 runs, stacked")):
            if key in o:
                p = o[key]
                print(f"{name:14} {label:24} wall {p['wall_s'] * 1e3:.0f} ms, GPU busy "
                      f"{p['gpu_busy_s'] * 1e3:.0f} ms, {p['kernels']} kernels")
                for kernel, ms, count in p["top"][:14]:
                    print(f"{'':16}{ms:8.1f} ms {count:5}x  {kernel}")
                print(f"{'':16}host (own CPU time):")
                for op, ms, count in p.get("host_top", []):
                    print(f"{'':16}{ms:8.1f} ms {count:5}x  {op}")
        print(f"{name:14} {'handoff (snap+slot)':24} {o['handoff_ms']:8.2f}ms  snapshot alone {o['snapshot_ms']:.2f} ms")
        for peer in ("peft", "peft+liger"):
            m = r.get(peer)
            if m is None:
                continue
            if "error" in m:
                print(f"{name:14} {peer:24} {'-':>9}  {m['error']}")
                continue
            note = ("grad ckpt (OOM without)" if m.get("oom_without_ckpt") else "") + \
                ("" if m["lm_head_lora"] else " no LoRA on lm_head")
            print(f"{name:14} {peer:24} {m['tok_s']:9.0f} {m['mfu']:6.1%} {m['peak_gb']:8.1f}  {note}")
    ok = all(c["ok"] for c in report["checks"].values())
    print("checks:", "PASS" if ok else "FAIL", json.dumps(report["checks"]))
    from tinkerbell.engine.kernels import segment_matmul

    print("grouped GEMM for several runs' LoRA:", "refused: " + segment_matmul.GROUPED_REFUSED
          if segment_matmul.GROUPED_REFUSED else "not refused",
          "| Triton segment add:", "failed: " + segment_matmul.ADD_KERNEL_FAILED
          if segment_matmul.ADD_KERNEL_FAILED else "not failed")
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "training_speed.json"), "w") as f:
            json.dump(report, f, indent=1, default=float)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
