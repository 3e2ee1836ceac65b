"""Triton kernels behind `gumbel_sample.sample_rows` (imported only where Triton is).

A row's vocabulary is cut into `splits` chunks, each scanned by its own program (so a batch of one row still
spreads over the GPU instead of one SM walking 128k logits), each leaving its best (score, index); a second
kernel reduces the chunks of a row. Scores are computed exactly as in the one-pass form, the maximum is exact
and ties go to the lowest index in both stages, so the split changes no draw.

`launch_logprob` also returns what the sampler reports with the token, in the same pass over the logits: each
chunk keeps an online (max, sum of exp) of the raw logits and the raw logit at its best index, and the reduce
forms the row's logsumexp and the token's raw logprob (logit - logsumexp, as sampling.py defines it). Logits
may be bfloat16 (the model's output, read without a float32 copy); they are widened exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinkerbell.engine.kernels import use_pdl
from tinkerbell.engine.kernels._pdl_triton import pdl_enter

BLOCK = 1024
_TARGET_PROGRAMS = 264  # about two programs per SM on an H100 (132 SMs)
_MAX_SPLITS = 64


@triton.jit
def _mix32(x):
    # int64 holding uint32 values, masked after each product: the same arithmetic as the torch form.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _kernel(logits_ptr, temp_ptr, key_ptr, best_ptr, idx_ptr, stats_ptr, V, stride_r, chunk, splits,
            BLOCK: tl.constexpr, STATS: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0)
    split = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    greedy = temp <= 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, temp))
    noise_scale = tl.where(greedy, 0.0, 1.0)
    key = tl.load(key_ptr + row).to(tl.int64)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = tl.full([BLOCK], 2147483647, dtype=tl.int32)
    best_raw = tl.zeros([BLOCK], dtype=tl.float32)
    m_lane = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    s_lane = tl.zeros([BLOCK], dtype=tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, V)
    for start in range(lo, hi, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < hi
        lg = tl.load(logits_ptr + row * stride_r + idx, mask=mask, other=float("-inf")).to(tl.float32)
        bits = _mix32(key ^ ((idx.to(tl.int64) * 0x9E3779B1) & 0xFFFFFFFF))
        u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        g = -tl.log(-tl.log(u))
        score = tl.where(mask, lg * inv_t + g * noise_scale, float("-inf"))
        # Strictly greater keeps the earlier index within a lane; lanes are merged lowest-index-first below.
        better = score > best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, idx, best_idx)
        if STATS:
            best_raw = tl.where(better, lg, best_raw)
            m_new = tl.where(mask, tl.maximum(m_lane, lg), m_lane)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane of only -inf logits sums to 0
            s_lane = tl.where(mask, s_lane * tl.exp(m_lane - m_ref) + tl.exp(lg - m_ref), s_lane)
            m_lane = m_new
    top = tl.max(best, 0)
    cand = tl.where(best == top, best_idx, 2147483647)
    first = tl.min(cand, 0)
    tl.store(best_ptr + row * splits + split, top)
    tl.store(idx_ptr + row * splits + split, first)
    if STATS:
        # (raw logit at the chunk's pick, max, sum of exp relative to it): every chunk holds a real logit.
        m = tl.max(m_lane, 0)
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        at = row * splits * 3 + split * 3
        tl.store(stats_ptr + at, tl.sum(tl.where(best_idx == first, best_raw, 0.0), 0))
        tl.store(stats_ptr + at + 1, m)
        tl.store(stats_ptr + at + 2, tl.sum(s_lane * tl.exp(m_lane - m_ref), 0))


@triton.jit
def _reduce(best_ptr, idx_ptr, out_ptr, splits, S: tl.constexpr):
    row = tl.program_id(0)
    s = tl.arange(0, S)
    mask = s < splits
    best = tl.load(best_ptr + row * splits + s, mask=mask, other=float("-inf"))
    idx = tl.load(idx_ptr + row * splits + s, mask=mask, other=2147483647)
    top = tl.max(best, 0)
    cand = tl.where(mask & (best == top), idx, 2147483647)
    tl.store(out_ptr + row, tl.min(cand, 0).to(tl.int64))


@triton.jit
def _reduce_logprob(best_ptr, idx_ptr, stats_ptr, tok_ptr, both_ptr, lse_ptr, both_stride, splits,
                    S: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0)
    s = tl.arange(0, S)
    mask = s < splits
    best = tl.load(best_ptr + row * splits + s, mask=mask, other=float("-inf"))
    idx = tl.load(idx_ptr + row * splits + s, mask=mask, other=2147483647)
    raw = tl.load(stats_ptr + row * splits * 3 + s * 3, mask=mask, other=0.0)
    m = tl.load(stats_ptr + row * splits * 3 + s * 3 + 1, mask=mask, other=float("-inf"))
    se = tl.load(stats_ptr + row * splits * 3 + s * 3 + 2, mask=mask, other=0.0)
    top = tl.max(best, 0)
    tok = tl.min(tl.where(mask & (best == top), idx, 2147483647), 0)
    raw_tok = tl.sum(tl.where(mask & (idx == tok) & (best == top), raw, 0.0), 0)
    m_all = tl.max(m, 0)
    lse = m_all + tl.log(tl.sum(tl.where(mask & (m > float("-inf")), se * tl.exp(m - m_all), 0.0), 0))
    tl.store(tok_ptr + row, tok.to(tl.int64))
    tl.store(both_ptr + row, tok.to(tl.float64))
    tl.store(both_ptr + both_stride + row, (raw_tok - lse).to(tl.float64))
    tl.store(lse_ptr + row, lse)


def split_plan(rows: int, vocab: int) -> tuple[int, int]:
    """(chunks per row, chunk length): enough programs to fill the GPU, each chunk a whole number of blocks."""
    want = max(1, min(_MAX_SPLITS, -(-_TARGET_PROGRAMS // max(rows, 1)), -(-vocab // BLOCK)))
    chunk = -(-(-(-vocab // want)) // BLOCK) * BLOCK
    return -(-vocab // chunk), chunk


def _partials(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor,
              stats: bool) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The chunk pass: (chunks per row, best score and index per chunk, and with `stats` each chunk's
    [raw logit at its pick, max, sum of exp])."""
    r, v = logits.shape
    splits, chunk = split_plan(r, v)
    best = torch.empty(r, splits, dtype=torch.float32, device=logits.device)
    idx = torch.empty(r, splits, dtype=torch.int32, device=logits.device)
    pdl = use_pdl(logits)
    st = torch.empty(r, splits, 3, dtype=torch.float32, device=logits.device) if stats else None
    _kernel[(r, splits)](logits, temperatures.float(), keys, best, idx, st if stats else best, v, logits.stride(0),
                         chunk, splits, BLOCK=BLOCK, STATS=stats, num_warps=4, PDL=pdl, launch_pdl=pdl)
    return splits, best, idx, st


def launch(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    r = logits.shape[0]
    out = torch.empty(r, dtype=torch.int64, device=logits.device)
    if not r:
        return out
    splits, best, idx, _ = _partials(logits, temperatures, keys, stats=False)
    _reduce[(r,)](best, idx, out, splits, S=triton.next_power_of_2(splits), num_warps=1)
    return out


def launch_logprob(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor,
                   out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens int64 [R], [token ids; their raw logprobs] float64 [2, R], logsumexp float32 [R]), written into
    `out` when given (a captured graph's static buffers)."""
    r = logits.shape[0]
    dev = logits.device
    if out is None:
        out = (torch.empty(r, dtype=torch.int64, device=dev), torch.empty(2, r, dtype=torch.float64, device=dev),
               torch.empty(r, dtype=torch.float32, device=dev))
    tokens, both, lse = out
    if not r:
        return out
    splits, best, idx, stats = _partials(logits, temperatures, keys, stats=True)
    pdl = use_pdl(logits)
    _reduce_logprob[(r,)](best, idx, stats, tokens, both, lse, both.stride(0), splits,
                          S=triton.next_power_of_2(splits), num_warps=1, PDL=pdl, launch_pdl=pdl)
    return out
