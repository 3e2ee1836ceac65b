"""GPU check and speed of the training layer's fused ops (kernels/train_ops.py) and fused LoRA (training_lora.py)
against their plain-torch forms, at Llama-3.2-1B's shapes and 8k tokens.

For each op: forward + backward of the Triton path and of the torch form in bf16, and both against the torch
form in float32 (the reference): max |error| / max |reference| of outputs and input gradients. The bf16 paths
must stay within bf16 rounding of the reference (FAIL otherwise, exit status 1).

    PYTHONPATH=. python3 bench/train_ops_check.py [--tokens 8192]
"""

from __future__ import annotations

import argparse
import sys

import torch

from tinkerbell.engine.kernels import train_ops
from tinkerbell.engine.lora import AdapterWeights, LoraSegment, LoraSpec
from tinkerbell.engine import training_lora
from tinkerbell.engine.training_lora import TrainLora

TOL = 2e-2  # bf16 keeps 8 bits of mantissa; a few roundings deep


def bench(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def run(make_inputs, op_fast, op_torch, label: str, rows: list) -> bool:
    """make_inputs(dtype) -> leaf tensors; op(*inputs) -> output tensor(s)."""
    def fwd_bwd(op, inputs, upstream):
        outs = op(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], upstream[:len(outs)])
        return [o.float() for o in outs], [g.float() for g in grads]

    ref_in = make_inputs(torch.float32)
    ref_outs = op_torch(*ref_in)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    upstream = [torch.randn_like(o) for o in ref_outs]
    want = fwd_bwd(op_torch, ref_in, upstream)
    ok = True
    for name, op in (("fast", op_fast), ("torch", op_torch)):
        inputs = [t.detach().to(torch.bfloat16).requires_grad_(t.requires_grad) for t in ref_in]
        up = [u.to(torch.bfloat16) for u in upstream]
        got = fwd_bwd(op, inputs, up)
        err = max((g - w).abs().max().item() / max(w.abs().max().item(), 1e-6)
                  for gs, ws in zip(got, want) for g, w in zip(gs, ws))
        ms = bench(lambda: fwd_bwd(op, inputs, up))
        good = err <= TOL
        ok &= good
        rows.append((label, name, ms, err, "PASS" if good else "FAIL"))
    return ok


def gate_up_runs(runs: int, t: int, hidden: int, inter: int, dev: torch.device, g: torch.Generator,
                 alphas: tuple[int, ...] = (32,)) -> tuple[list[AdapterWeights], list[LoraSegment]]:
    """`runs` rank-32 gate/up adapters (alpha cycling through `alphas`), each on an equal share of t rows."""
    adapters = []
    for i in range(runs):
        a = AdapterWeights(spec=LoraSpec(rank=32, alpha=alphas[i % len(alphas)]))
        for k in ("gate", "up"):
            a.a[k] = (torch.randn(32, hidden, device=dev, generator=g) * 0.02).requires_grad_(True)
            a.b[k] = (torch.randn(inter, 32, device=dev, generator=g) * 0.02).requires_grad_(True)
        adapters.append(a)
    return adapters, [LoraSegment(i * t // runs, (i + 1) * t // runs, a) for i, a in enumerate(adapters)]


def check_lora_masters(dev: torch.device, t: int, hidden: int, inter: int, rows: list) -> bool:
    """The masters' gradients too (which `run` does not see): gate/up of 8 runs × t/8 rows in bf16, the exact
    several-run form (grouped GEMMs + Triton add) and the stacked one, against the per-segment reference in
    float32; timed forward + backward."""
    g = torch.Generator(device=dev).manual_seed(1)
    adapters, segs = gate_up_runs(8, t, hidden, inter, dev, g, alphas=(16, 32))  # two scales
    x = torch.randn(t, hidden, device=dev, generator=g)
    base = torch.randn(t, 2 * inter, device=dev, generator=g)
    up = torch.randn(t, 2 * inter, device=dev, generator=g)

    def step(fused: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        for a in adapters:
            for p in a.parameters():
                p.grad = None
        xi = x.detach().to(dtype).requires_grad_(True)
        out = TrainLora(segs, fused=fused).add(("gate", "up"), xi, base.to(dtype))
        out.backward(up.to(dtype))
        return [xi.grad.float()] + [p.grad.clone() for a in adapters for p in a.parameters()]

    want = step(False, torch.float32)
    ok = True
    for label, segmented in (("exact", True), ("stacked", False)):
        training_lora.SEGMENTED = segmented
        try:
            got = step(True, torch.bfloat16)
            err = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-6) for a, b in zip(got, want))
            ms = bench(lambda: step(True, torch.bfloat16), iters=10)
        finally:
            training_lora.SEGMENTED = True
        good = err <= TOL
        ok &= good
        rows.append(("LoRA gate/up 8 runs, +masters", label, ms, err, "PASS" if good else "FAIL"))
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    t, hidden, inter, heads, kvh, d = args.tokens, 2048, 8192, 32, 8, 64
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows: list = []
    ok = True

    w = torch.rand(hidden, device=dev, generator=g) + 0.5
    ok &= run(lambda dt: [torch.randn(t, hidden, device=dev, generator=g, dtype=dt).requires_grad_(True),
                          torch.randn(t, hidden, device=dev, generator=g, dtype=dt).requires_grad_(True), w.to(dt)],
              lambda x, r, w: train_ops.rms_norm(x, w, 1e-5, residual=r),
              lambda x, r, w: train_ops.rms_norm_torch(x, w, 1e-5, residual=r), "add + RMSNorm", rows)

    pos = torch.arange(t, device=dev).float() % 1024
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device=dev).float() / d))
    emb = torch.cat([pos[:, None] * inv, pos[:, None] * inv], dim=-1)
    ok &= run(lambda dt: [torch.randn(t, (heads + 2 * kvh) * d, device=dev, generator=g, dtype=dt).requires_grad_(True),
                          emb.cos().to(dt), emb.sin().to(dt)],
              lambda qkv, c, s: train_ops.rope_qkv(qkv, c, s, heads, kvh, d),
              lambda qkv, c, s: train_ops.rope_qkv_torch(qkv, c, s, heads, kvh, d), "RoPE q/k/v", rows)

    ok &= run(lambda dt: [torch.randn(t, 2 * inter, device=dev, generator=g, dtype=dt).requires_grad_(True)],
              train_ops.silu_mul, train_ops.silu_mul_torch, "SiLU·mul", rows)

    vocab, chunk = 128256, 261  # one of the Trainer's logits chunks (2^25 elements)
    rows_t = torch.arange(chunk, device=dev)
    ids_t = torch.randint(0, vocab, (chunk,), device=dev, generator=g)
    ok &= run(lambda dt: [(torch.randn(chunk, vocab, device=dev, generator=g) * 3).to(dt).requires_grad_(True)],
              lambda x: train_ops.target_logprobs(x, rows_t, ids_t),
              lambda x: train_ops.target_logprobs_torch(x, rows_t, ids_t), "target logprobs (chunk)", rows)

    # LoRA r32 on gate/up of one run and of 8 runs (1k rows each), fused vs per-segment reference.
    for runs in (1, 8):
        adapters, segs = gate_up_runs(runs, t, hidden, inter, dev, g)
        fused, ref = TrainLora(segs, fused=True), TrainLora(segs, fused=False)
        ok &= run(lambda dt: [torch.randn(t, hidden, device=dev, generator=g, dtype=dt).requires_grad_(True),
                              torch.randn(t, 2 * inter, device=dev, generator=g, dtype=dt)],
                  lambda x, base: fused.add(("gate", "up"), x, base.clone()),
                  lambda x, base: ref.add(("gate", "up"), x, base.clone()), f"LoRA gate/up, {runs} run(s)", rows)
        for a in adapters:
            for p in a.parameters():
                p.grad = None

    ok &= check_lora_masters(dev, t, hidden, inter, rows)

    print(f"train ops on {torch.cuda.get_device_name(dev)}, {t} tokens, 1B shapes; error vs float32 torch form")
    print(f"{'op':24} {'path':6} {'fwd+bwd ms':>10} {'max rel err':>12}")
    for label, name, ms, err, verdict in rows:
        print(f"{label:24} {name:6} {ms:10.3f} {err:12.2e}  {verdict}")
    from tinkerbell.engine.kernels import segment_matmul

    print("grouped GEMM for the LoRA segments:", "refused: " + segment_matmul.GROUPED_REFUSED
          if segment_matmul.GROUPED_REFUSED else "used",
          "| Triton segment add:", segment_matmul.ADD_KERNEL_FAILED or "used")
    print("train_ops_check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
