"""Triton kernel behind `gemv.linear` (imported only where Triton is).

y[n] = sum_k x[k] W[n, k] for one row x: each program owns BLOCK_N output rows and walks the whole K axis in
BLOCK_K steps, so each weight element is read exactly once with 16-byte loads and no split-K reduction pass.
(Computing the input in the prologue — RMSNorm of the residual sum, or SiLU·mul of gate/up — was measured on the
H100 at commit 11136c7 and saved 0.3 µs and nothing against the separate kernels, so it was dropped.)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tinkerbell.engine.kernels import use_pdl
from tinkerbell.engine.kernels._pdl_triton import pdl_enter


# Load the first weight tile before waiting on the previous kernel (an A/B switch while it is being measured).
PREFETCH = os.environ.get("TINKERBELL_GEMV_PREFETCH", "1") != "0"


@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          PDL: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_K)
    cm = cols < K
    wmask = rmask[:, None] & cm[None, :]
    if PREFETCH:
        # The first weight tile does not depend on the previous kernel (weights are static): under PDL its
        # load overlaps that kernel's tail.
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=wmask, other=0.0)
        pdl_enter(PDL)
    else:
        pdl_enter(PDL)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=wmask, other=0.0)
    x = tl.load(x_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * x[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cm = cols < K
        x = tl.load(x_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


def config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [n, k] weight. Four rows a program was the fastest
    choice for every 1B/8B projection shape on the H100 (many small programs keep every SM streaming), with
    512-wide (1 KB) row chunks, pipelined four deep."""
    block_k = 512 if k >= 512 else triton.next_power_of_2(k)
    return 4, block_k, 4, 4


def launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           cfg: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """y [1, n] = x [1, k] @ w[n, k].T (+ bias)"""
    n, k = w.shape
    y = torch.empty(1, n, dtype=w.dtype, device=w.device)
    bn, bk, warps, stages = cfg or config(n, k)
    pdl = use_pdl(x)
    _gemv[(triton.cdiv(n, bn),)](x, w, bias if bias is not None else w, y, n, k, HAS_BIAS=bias is not None,
                                 BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
                                 PDL=pdl, PREFETCH=pdl and PREFETCH, launch_pdl=pdl)
    return y
