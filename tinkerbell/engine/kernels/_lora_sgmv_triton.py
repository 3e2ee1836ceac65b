"""Triton kernels behind `lora_sgmv.lora_apply` (imported only where Triton is)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinkerbell.engine.kernels.lora_sgmv import TILE_M, LoraTiles


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, y_ptr, rows_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr, present_ptr, K,
                   stride_xt, stride_as, stride_ar, stride_yt,
                   TM: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, KCHUNK: tl.constexpr,
                   PRECISION: tl.constexpr):
    # Split over the input dim (program_id 1): a decode tile has few rows, so one program per tile walking the
    # whole input (8192 for down_proj) would leave most SMs idle; partial sums meet in y by atomic adds.
    tile = tl.program_id(0)
    n = tl.load(tile_len_ptr + tile)
    if n == 0:
        return
    slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
    if tl.load(present_ptr + slot) == 0:
        return
    start = tl.load(tile_start_ptr + tile)
    m = tl.arange(0, TM)
    mmask = m < n
    rows = tl.load(rows_ptr + start + m, mask=mmask, other=0).to(tl.int64)
    r = tl.arange(0, R)
    acc = tl.zeros([TM, R], dtype=tl.float32)
    k_lo = tl.program_id(1) * KCHUNK
    for k0 in range(k_lo, k_lo + KCHUNK, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xt + kk[None, :], mask=mmask[:, None] & kmask[None, :],
                     other=0.0)
        at = tl.load(a_ptr + slot * stride_as + r[None, :] * stride_ar + kk[:, None], mask=kmask[:, None],
                     other=0.0)
        acc += tl.dot(xt.to(at.dtype), at, input_precision=PRECISION)
    tl.atomic_add(y_ptr + rows[:, None] * stride_yt + r[None, :], acc, mask=mmask[:, None])


@triton.jit
def _expand_kernel(y_ptr, b_ptr, scale_ptr, o_ptr, rows_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr,
                   present_ptr, N,
                   stride_yt, stride_bs, stride_bn, stride_ot,
                   TM: tl.constexpr, R: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    nb = tl.program_id(1)
    n = tl.load(tile_len_ptr + tile)
    if n == 0:
        return
    slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
    if tl.load(present_ptr + slot) == 0:
        return
    start = tl.load(tile_start_ptr + tile)
    m = tl.arange(0, TM)
    mmask = m < n
    rows = tl.load(rows_ptr + start + m, mask=mmask, other=0).to(tl.int64)
    r = tl.arange(0, R)
    cols = nb * BN + tl.arange(0, BN)
    cmask = cols < N
    y = tl.load(y_ptr + rows[:, None] * stride_yt + r[None, :], mask=mmask[:, None], other=0.0)
    bt = tl.load(b_ptr + slot * stride_bs + cols[None, :] * stride_bn + r[:, None], mask=cmask[None, :], other=0.0)
    # The reference rounds x·Aᵀ to the adapter dtype before the second product; so does this.
    delta = tl.dot(y.to(bt.dtype), bt, input_precision=PRECISION) * tl.load(scale_ptr + slot)
    optrs = o_ptr + rows[:, None] * stride_ot + cols[None, :]
    omask = mmask[:, None] & cmask[None, :]
    cur = tl.load(optrs, mask=omask, other=0.0)
    tl.store(optrs, (cur.to(tl.float32) + delta).to(o_ptr.dtype.element_ty), mask=omask)


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


KCHUNK = 256


def shrink(x: torch.Tensor, a: torch.Tensor, tiles: LoraTiles, present: torch.Tensor) -> torch.Tensor:
    rank, k = a.shape[1], a.shape[2]
    assert rank & (rank - 1) == 0, "max_lora_rank must be a power of two for the Triton LoRA path"
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.zeros((x.shape[0], rank), dtype=torch.float32, device=x.device)
    bk = 64 if rank <= 64 else 32
    _shrink_kernel[(tiles.tile_len.shape[0], triton.cdiv(k, KCHUNK))](
        x, a, y, tiles.rows, tiles.tile_slot, tiles.tile_start, tiles.tile_len, present, k,
        x.stride(0), a.stride(0), a.stride(1), y.stride(0),
        TM=TILE_M, R=rank, BK=bk, KCHUNK=KCHUNK, PRECISION=_precision(a), num_warps=4)
    return y


def expand(y: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, tiles: LoraTiles,
           present: torch.Tensor) -> None:
    n, rank = b.shape[1], b.shape[2]
    assert out.stride(-1) == 1
    bn = 128
    _expand_kernel[(tiles.tile_len.shape[0], triton.cdiv(n, bn))](
        y, b, scales, out, tiles.rows, tiles.tile_slot, tiles.tile_start, tiles.tile_len, present, n,
        y.stride(0), b.stride(0), b.stride(1), out.stride(0),
        TM=TILE_M, R=rank, BN=bn, PRECISION=_precision(b), num_warps=4)
