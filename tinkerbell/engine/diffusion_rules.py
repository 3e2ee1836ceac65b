"""Masked-diffusion decoding rules shared by every algorithm: the algorithm names, the reference's per-step
transfer schedule, Gumbel-noise proposals and which proposals a step commits (fixed count, `threshold`,
`factor`). `engine/diffusion.py` runs them over batches; the tests hold them to plain re-implementations.
"""

from __future__ import annotations

from typing import Any

import torch

from tinkerbell.engine.types import EngineUserError

ALGORITHMS: dict[str, str] = {
    "basic": "full forward every step (the reference algorithm)",
    "prefix_cache": "block-wise approximate KV cache of the prefix before the current block",
    "dual_cache": "block-wise approximate KV cache of the prefix and of the suffix after the current block",
}
ALIASES = {"no_cache": "basic", "simple": "basic"}
REMASKING = ("low_confidence", "random")
def canonical_algorithm(name: str) -> str:
    key = ALIASES.get(name, name)
    if key not in ALGORITHMS:
        known = ", ".join([*ALGORITHMS, *ALIASES])
        raise EngineUserError(f"generation_algorithm: unknown algorithm {name!r}; known: {known}")
    return key


def algorithm_listing(default: str) -> dict[str, Any]:
    """What `GET /generation/algorithms` answers."""
    return {"default": default,
            "algorithms": [{"name": n, "description": d, "aliases": [a for a, t in ALIASES.items() if t == n]}
                           for n, d in ALGORITHMS.items()],
            "remasking": list(REMASKING)}


def transfer_schedule(masked: int, steps: int) -> list[int]:
    """How many tokens each of `steps` steps commits to unmask `masked` tokens (the reference's schedule)."""
    base, rem = divmod(masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def propose(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> torch.Tensor:
    """Each position's proposal: argmax, with Gumbel noise at temperature > 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=gen, device=logits.device, dtype=torch.float64)
    return (logits.double() - temperature * torch.log(-torch.log(u))).argmax(-1)


def select_transfer(conf: torch.Tensor, masked: int, k: int | None, threshold: float | None,
                    factor: float | None) -> torch.Tensor:
    """Which positions to commit, given confidences (-inf where not masked) and `masked` = their count."""
    out = torch.zeros_like(conf, dtype=torch.bool)
    if masked == 0:
        return out
    if factor is not None:
        # Fast-dLLM's dynamic rule, including its edge case: stopping at the last candidate commits all. Worked
        # out on the device (no host sync): the first failing rank (else the last), then that many by rank.
        ranked, order = conf.sort(descending=True)
        ranked, order = ranked[:masked], order[:masked]
        rank = torch.arange(masked, device=conf.device)
        bounds = 1 - factor / (rank.to(ranked.dtype) + 2)
        bounds[0] = -1.0
        first = torch.where(ranked < bounds, rank, masked - 1).min()
        count = torch.where((first == 0) | (first == masked - 1), first + 1, first)
        return out.scatter_(0, order, rank < count)
    elif threshold is not None:
        out = conf >= threshold
        out[conf.argmax()] = True
        return out & torch.isfinite(conf)
    assert k is not None
    out[conf.topk(min(k, masked)).indices] = True
    return out
