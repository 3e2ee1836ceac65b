"""Triton kernel behind kernels/segment_matmul.py (imported only where Triton is): out[rows] += y[rows] · w[g]
over row tiles of one segment each, accumulating in float32 and adding into `out` in place."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mm_add_kernel(y_ptr, w_ptr, o_ptr, tiles_ptr, N, K, stride_y, stride_wg, stride_wk, stride_wn, stride_o,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    t = tl.program_id(0)
    g = tl.load(tiles_ptr + 3 * t).to(tl.int64)
    start = tl.load(tiles_ptr + 3 * t + 1).to(tl.int64)
    length = tl.load(tiles_ptr + 3 * t + 2)
    m = tl.arange(0, BM)
    rows = start + m
    rmask = m < length
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = cols < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        yv = tl.load(y_ptr + rows[:, None] * stride_y + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wv = tl.load(w_ptr + g * stride_wg + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                     mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.dot(yv, wv, input_precision=PRECISION)
    optrs = o_ptr + rows[:, None] * stride_o + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    cur = tl.load(optrs, mask=omask, other=0.0)
    tl.store(optrs, (cur.to(tl.float32) + acc).to(o_ptr.dtype.element_ty), mask=omask)


def mm_add(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor, tiles: torch.Tensor) -> None:
    """out [T, N] += y[rows of tile] · w[segment of tile] (w [G, K, N], any strides), tiles int32 [NT, 3]."""
    from tinkerbell.engine.kernels.segment_matmul import TILE_M

    n, k = out.shape[1], y.shape[1]
    bn = 128
    bk = max(16, min(64, triton.next_power_of_2(k)))
    _mm_add_kernel[(tiles.shape[0], triton.cdiv(n, bn))](
        y, w, out, tiles, n, k, y.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        BM=TILE_M, BN=bn, BK=bk, PRECISION="ieee" if out.dtype == torch.float32 else "tf32", num_warps=4)
