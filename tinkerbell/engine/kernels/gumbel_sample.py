"""Batched token selection with per-row seeded noise and no per-row Python: the fast path's sampler.

Each row's noise is a counter-based hash of (row key, vocabulary index), where the row key hashes the
sequence's seed and the position it is drawing for. So a draw depends only on that row's logits, seed and
position: batch-independent, and a preempted sequence redraws the same token, with no generator state to keep.
The draw is the Gumbel-max trick, argmax(logits / T + G) with G = -log(-log U), which is the exponential race of
the reference sampler (sampling.sample) written in log space. Temperature 0 rows take the plain argmax.

The Triton kernel does one pass over each row's logits (noise made in registers); the torch form computes the
same hash with int64 ops and is the CPU path and the kernel's reference.
"""

from __future__ import annotations

import torch

from tinkerbell.engine.kernels import use_triton

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons) on int64 tensors holding uint32 values; products wrap but their low 32 bits hold."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """uint32 key (in int64) of each row's draw from its 63-bit seed and the position it samples for."""
    hi = _mix32((seeds >> 32) & _M32)
    k = _mix32((seeds & _M32) ^ hi)
    return _mix32(k ^ (positions & _M32))


def gumbel_torch(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise [R, V] (float32) of each row's key."""
    idx = (torch.arange(vocab, device=keys.device, dtype=torch.int64) * _GOLDEN) & _M32
    bits = _mix32(keys[:, None] ^ idx[None, :])
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)  # 24 bits: exact in float32, never 0 or 1
    return -torch.log(-torch.log(u))


def sample_rows(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One token per row of float32 `logits` [R, V]: argmax where temperature is 0, else a Gumbel-max draw."""
    if use_triton(logits) and logits.stride(-1) == 1:
        from tinkerbell.engine.kernels._gumbel_sample_triton import launch

        return launch(logits, temperatures, keys)
    return sample_rows_torch(logits, temperatures, keys)


def sample_rows_torch(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    greedy = temperatures <= 0
    temps = torch.where(greedy, torch.ones_like(temperatures), temperatures)
    scores = logits / temps[:, None] + gumbel_torch(keys, logits.shape[-1])
    scores = torch.where(greedy[:, None], logits, scores)
    return scores.argmax(dim=-1)


def sample_rows_logprob(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor,
                        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sample_rows` plus what the sampler reports with each token, from one pass over the logits (float32
    or the model's bfloat16): (tokens int64 [R], [tokens; raw logprobs] float64 [2, R], logsumexp float32 [R]).
    The raw logprob is log_softmax at temperature 1 (sampling.py's convention). `out`: buffers to fill."""
    if use_triton(logits) and logits.stride(-1) == 1:
        from tinkerbell.engine.kernels._gumbel_sample_triton import launch_logprob

        return launch_logprob(logits, temperatures, keys, out)
    got = sample_rows_logprob_torch(logits, temperatures, keys)
    if out is None:
        return got
    for dst, src in zip(out, got):
        dst.copy_(src)
    return out


def sample_rows_logprob_torch(logits: torch.Tensor, temperatures: torch.Tensor,
                              keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lf = logits.float()
    tokens = sample_rows_torch(lf, temperatures, keys)
    lse = lf.logsumexp(dim=-1)
    lps = lf.gather(-1, tokens[:, None]).squeeze(-1) - lse
    return tokens, torch.stack([tokens.double(), lps.double()]), lse
