"""Triton kernels behind `gemv.gemv` (imported only where Triton is).

y[n] = sum_k x[k] W[n, k] for one row x: each program owns BLOCK_N output rows and walks the whole K axis in
BLOCK_K steps, so each weight element is read exactly once with 16-byte loads and no split-K reduction pass.
The prologue can compute the input on the fly instead of reading it from a buffer another kernel wrote:
`PRO_NORM` (x = RMSNorm(x + residual) · w, the residual sum written by program 0) and `PRO_SILU` (x =
silu(g) · u from the fused gate/up output). The model does not use them: on the H100 they saved 0.3 µs
(norm + QKV) and nothing (SiLU + down) against the separate kernels (bench/decode_probe.py, which keeps
measuring them, and docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv(x_ptr, res_ptr, nw_ptr, res_out_ptr, w_ptr, y_ptr, N, K, eps,
          HAS_RES: tl.constexpr, PRO_NORM: tl.constexpr, PRO_SILU: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    inv = 1.0
    if PRO_NORM:
        # Sum of squares of (x + residual) over K, in float32: every program computes it from L2-resident x.
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cm = cols < K
            h = tl.load(x_ptr + cols, mask=cm, other=0.0)
            if HAS_RES:
                h = h + tl.load(res_ptr + cols, mask=cm, other=0.0)
                if pid == 0:
                    tl.store(res_out_ptr + cols, h, mask=cm)
            hf = h.to(tl.float32)
            ss += hf * hf
        inv = tl.rsqrt(tl.sum(ss, 0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cm = cols < K
        if PRO_SILU:
            g = tl.load(x_ptr + cols, mask=cm, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + cols, mask=cm, other=0.0).to(tl.float32)
            # As silu_mul_torch: silu in float32, rounded to the activation dtype, then the product rounded.
            s = (g / (1.0 + tl.exp(-g))).to(x_ptr.dtype.element_ty).to(tl.float32)
            x = (s * u).to(x_ptr.dtype.element_ty).to(tl.float32)
        elif PRO_NORM:
            h = tl.load(x_ptr + cols, mask=cm, other=0.0)
            if HAS_RES:
                h = h + tl.load(res_ptr + cols, mask=cm, other=0.0)
            nw = tl.load(nw_ptr + cols, mask=cm, other=0.0)
            # As add_rmsnorm_torch: normalised in float32, rounded to the dtype, then times the weight.
            x = (nw * (h.to(tl.float32) * inv).to(x_ptr.dtype.element_ty)).to(tl.float32)
        else:
            x = tl.load(x_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


def config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [n, k] weight. Four rows a program was the fastest
    choice for every 1B/8B projection shape on the H100 (many small programs keep every SM streaming), with
    512-wide (1 KB) row chunks, pipelined four deep."""
    block_k = 512 if k >= 512 else triton.next_power_of_2(k)
    return 4, block_k, 4, 4


def launch(x: torch.Tensor, w: torch.Tensor, *, residual: torch.Tensor | None = None,
           norm_weight: torch.Tensor | None = None, eps: float = 0.0, silu: bool = False,
           cfg: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y [1, n] (and the new residual sum when `residual` is given). x: [1, k] (or [1, 2k] with `silu`)."""
    n, k = w.shape
    y = torch.empty(1, n, dtype=w.dtype, device=w.device)
    res_out = torch.empty(1, k, dtype=x.dtype, device=x.device) if residual is not None else None
    bn, bk, warps, stages = cfg or config(n, k)
    dummy = x
    _gemv[(triton.cdiv(n, bn),)](
        x, residual if residual is not None else dummy, norm_weight if norm_weight is not None else dummy,
        res_out if res_out is not None else dummy, w, y, n, k, eps,
        HAS_RES=residual is not None, PRO_NORM=norm_weight is not None, PRO_SILU=silu,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y, res_out
