"""A training run's fp32 master LoRA weights as one buffer, the per-module tensors views of it.

Why: a run's adapter is hundreds of tensors (226 for Llama-3.2-1B with every module and the LM head adapted),
and everything done to them one by one costs a kernel launch each: the cast to the model's dtype in every
forward, each op of the optimizer step, the snapshot for the sampler. With one buffer those are one launch per
run (an 8-run step on the 1B model launched ~1,800 casts a forward, measured on an H100). The module tensors
stay leaf tensors (autograd accumulates into their `.grad` as before); only their storage is shared.

Layout: every A in key order, then every B, so the A's of a fused projection (q/k/v, gate/up) are adjacent.
"""

from __future__ import annotations

import torch

from tinkerbell.engine.lora import AdapterWeights


def pack(weights: AdapterWeights) -> AdapterWeights:
    """The same adapter with its tensors re-homed into one contiguous buffer (`weights.flat`), each a leaf
    view that requires grad. Already packed weights come back as they are."""
    if weights.flat is not None:
        return weights
    tensors = ordered(weights)
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.zeros(0)
    views, at = [], 0
    for t in tensors:
        views.append(flat[at:at + t.numel()].view(t.shape).requires_grad_(True))
        at += t.numel()
    return assemble(weights, views, flat)


def ordered(weights: AdapterWeights) -> list[torch.Tensor]:
    """Every A in key order, then every B: the packed buffer's order."""
    return list(weights.a.values()) + [weights.b[k] for k in weights.a]


def assemble(like: AdapterWeights, tensors: list[torch.Tensor], flat: torch.Tensor | None = None) -> AdapterWeights:
    """An adapter with `like`'s spec and keys over `tensors` (in `ordered`'s order)."""
    keys = list(like.a)
    n = len(keys)
    return AdapterWeights(spec=like.spec, a=dict(zip(keys, tensors[:n])), b=dict(zip(keys, tensors[n:])), flat=flat)


def views_like(buffer: torch.Tensor, flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `buffer` (laid out as `flat`, any dtype) at the places the `tensors` (views of `flat`) hold."""
    base = flat.storage_offset()
    out = []
    for t in tensors:
        at = t.storage_offset() - base
        out.append(buffer[at:at + t.numel()].view(t.shape))
    return out



# A pass's gradients are kept apart from the runs' earlier ones (requests since their last optim_step) until it
# succeeds, so a pass that fails midway leaves every run as it was (Trainer.run_segments).
Grads = list[tuple[torch.Tensor, "torch.Tensor | None"]]


def set_aside_grads(runs: list[AdapterWeights]) -> Grads:
    """(master, its gradient so far) for every master of `runs` (each run once); their `.grad` cleared."""
    out: Grads = []
    for w in {id(w): w for w in runs}.values():
        for p in ordered(w):
            out.append((p, p.grad))
            p.grad = None
    return out


def restore_grads(earlier: Grads) -> None:
    """Back to the gradients set aside, dropping what a failed pass accumulated."""
    for p, g in earlier:
        p.grad = g


def add_back_grads(earlier: Grads) -> None:
    """The pass's gradients plus those set aside: one multi-tensor add where both exist."""
    new, old = [], []
    for p, g in earlier:
        if g is None:
            continue
        if p.grad is None:
            p.grad = g
        else:
            new.append(p.grad)
            old.append(g)
    if new:
        torch._foreach_add_(new, old)
