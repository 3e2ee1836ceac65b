"""Triton kernel behind `gumbel_sample.sample_rows` (imported only where Triton is)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    # int64 holding uint32 values, masked after each product: the same arithmetic as the torch form.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _kernel(logits_ptr, temp_ptr, key_ptr, out_ptr, V, stride_r, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temp = tl.load(temp_ptr + row)
    greedy = temp <= 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, temp))
    noise_scale = tl.where(greedy, 0.0, 1.0)
    key = tl.load(key_ptr + row).to(tl.int64)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = tl.full([BLOCK], 2147483647, dtype=tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < V
        lg = tl.load(logits_ptr + row * stride_r + idx, mask=mask, other=float("-inf"))
        bits = _mix32(key ^ ((idx.to(tl.int64) * 0x9E3779B1) & 0xFFFFFFFF))
        u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        g = -tl.log(-tl.log(u))
        score = tl.where(mask, lg * inv_t + g * noise_scale, float("-inf"))
        # Strictly greater keeps the earlier index within a lane; lanes are merged lowest-index-first below.
        better = score > best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, idx, best_idx)
    top = tl.max(best, 0)
    cand = tl.where(best == top, best_idx, 2147483647)
    tl.store(out_ptr + row, tl.min(cand, 0).to(tl.int64))


def launch(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    r, v = logits.shape
    out = torch.empty(r, dtype=torch.int64, device=logits.device)
    if r:
        _kernel[(r,)](logits, temperatures.float(), keys, out, v, logits.stride(0), BLOCK=1024, num_warps=4)
    return out
