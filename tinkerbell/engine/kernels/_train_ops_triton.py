"""Triton kernels behind kernels/train_ops.py (imported only where Triton is): the training layer's elementwise
work, forward and backward, one launch each. Arithmetic in float32, rounded to the model dtype where the torch
form rounds (the normalised activations before the weight, SiLU before the product)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinkerbell.engine.kernels._fused_layer_triton import _add_rmsnorm_kernel, norm_launch, rotate_heads
from tinkerbell.engine.kernels._fused_layer_triton import silu_mul as silu_mul_forward  # noqa: F401


@triton.jit
def _rmsnorm_bwd_kernel(dy_ptr, s_ptr, w_ptr, rstd_ptr, ds_ptr, dx_ptr, N, stride_dy, stride_s, stride_ds,
                        stride_dx, HAS_DS: tl.constexpr, BLOCK: tl.constexpr):
    # y = w · s · rstd with rstd = (mean(s²) + eps)^-½  ⇒  ds = rstd · (w·dy) − s · rstd³ · Σ(w·dy·s) / N
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32) \
        * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    dx = rstd * g - s * (rstd * rstd * rstd) * (tl.sum(g * s, 0) / N)
    if HAS_DS:
        dx += tl.load(ds_ptr + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def rmsnorm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, rstd): s = x + residual (x itself without one), y = RMSNorm(s) · weight, rstd per row (float32)."""
    t, n = x.shape
    y = torch.empty(t, n, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    s = x if residual is None else torch.empty_like(x)
    rstd = torch.empty(t, dtype=torch.float32, device=x.device)
    if t:
        r = x if residual is None else residual
        _add_rmsnorm_kernel[(t,)](x, r, s, weight, y, rstd, n, eps, x.stride(0), r.stride(0), s.stride(0),
                                  y.stride(0), HAS_RES=residual is not None, STORE_RSTD=True, PDL=False,
                                  **norm_launch(n))
    return y, s, rstd


def rmsnorm_bwd(dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                ds: torch.Tensor | None) -> torch.Tensor:
    """Gradient w.r.t. s (plus `ds`, the gradient that reached s from its other uses)."""
    t, n = s.shape
    dx = torch.empty_like(s)
    if t:
        d = dy if ds is None else ds
        _rmsnorm_bwd_kernel[(t,)](dy, s, weight, rstd, d, dx, n, dy.stride(0), s.stride(0), d.stride(0),
                                  dx.stride(0), HAS_DS=ds is not None, **norm_launch(n))
    return dx


@triton.jit
def _rope_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vo_ptr,
                 sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, s_cos, sqo_t, sqo_h, sko_t, sko_h, svo_t, svo_h,
                 H: tl.constexpr, KVH: tl.constexpr, HP: tl.constexpr, KP: tl.constexpr, HALF: tl.constexpr,
                 SIGN: tl.constexpr):
    # Rotates q and k of one token by its angle (SIGN -1: by minus it, the backward) and copies v.
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HALF)
    c = tl.load(cos_ptr + t * s_cos + i).to(tl.float32)
    s = tl.load(sin_ptr + t * s_cos + i).to(tl.float32) * SIGN
    rotate_heads(q_ptr + t * sq_t, sq_h, qo_ptr + t * sqo_t, sqo_h, c, s, H, HP, HALF)
    rotate_heads(k_ptr + t * sk_t, sk_h, ko_ptr + t * sko_t, sko_h, c, s, KVH, KP, HALF)
    kh = tl.arange(0, KP)
    km = (kh < KVH)[:, None]
    d = tl.arange(0, 2 * HALF)
    v = tl.load(v_ptr + t * sv_t + kh[:, None] * sv_h + d[None, :], mask=km, other=0.0)
    tl.store(vo_ptr + t * svo_t + kh[:, None] * svo_h + d[None, :], v.to(vo_ptr.dtype.element_ty), mask=km)


def rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         qo: torch.Tensor, ko: torch.Tensor, vo: torch.Tensor, sign: int) -> None:
    """qo, ko = RoPE(q, k) (sign -1: the inverse rotation), vo = v; all [T, heads, D] with unit last stride."""
    t, h, d = q.shape
    kvh = k.shape[1]
    if t:
        _rope_kernel[(t,)](q, k, v, cos, sin, qo, ko, vo, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           v.stride(0), v.stride(1), cos.stride(0), qo.stride(0), qo.stride(1), ko.stride(0),
                           ko.stride(1), vo.stride(0), vo.stride(1), H=h, KVH=kvh, HP=triton.next_power_of_2(h),
                           KP=triton.next_power_of_2(kvh), HALF=d // 2, SIGN=sign, num_warps=4)


@triton.jit
def _silu_mul_bwd_kernel(gu_ptr, dh_ptr, dgu_ptr, N, stride_g, stride_h, stride_d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gu_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_g + N + cols, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = (g * sig).to(gu_ptr.dtype.element_ty).to(tl.float32)  # the forward's rounded SiLU
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dgu_ptr + row * stride_d + cols, dg.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + row * stride_d + N + cols, (dh * silu).to(dgu_ptr.dtype.element_ty), mask=mask)


def silu_mul_bwd(gu: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """d[g | u] of h = silu(g) · u, given dh."""
    t, n2 = gu.shape
    n = n2 // 2
    dgu = torch.empty(t, n2, dtype=gu.dtype, device=gu.device)
    if t:
        block = 1024
        _silu_mul_bwd_kernel[(t, triton.cdiv(n, block))](gu, dh, dgu, n, gu.stride(0), dh.stride(0),
                                                          dgu.stride(0), BLOCK=block, num_warps=4)
    return dgu


@triton.jit
def _row_lse_kernel(x_ptr, lse_ptr, V, stride_x, BLOCK: tl.constexpr):
    # One row's log-sum-exp in one pass over the vocabulary (running max and rescaled sum), in float32.
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, x)
        # lanes still at -inf (nothing seen yet) keep a zero sum instead of exp(nan)
        acc = tl.where(new_m == float("-inf"), 0.0, acc * tl.exp(m - new_m) + tl.exp(x - new_m))
        m = new_m
    top = tl.max(m, 0)
    total = tl.sum(tl.where(m == float("-inf"), 0.0, acc * tl.exp(m - top)), 0)
    tl.store(lse_ptr + row, top + tl.log(total))


@triton.jit
def _softmax_scale_kernel(x_ptr, lse_ptr, g_ptr, out_ptr, V, stride_x, stride_o, BLOCK: tl.constexpr):
    # out[row] = g[row] · softmax(x[row]): the gradient of g · logsumexp, written in the logits' dtype.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.load(lse_ptr + row)) * tl.load(g_ptr + row)
    tl.store(out_ptr + row * stride_o + cols, p.to(out_ptr.dtype.element_ty), mask=mask)


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row of x [R, V] (any float dtype), float32 [R]."""
    r, v = x.shape
    lse = torch.empty(r, dtype=torch.float32, device=x.device)
    if r:
        _row_lse_kernel[(r,)](x, lse, v, x.stride(0), BLOCK=4096, num_warps=8)
    return lse


def softmax_scale(x: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g[:, None] · softmax(x) in x's dtype, from the forward's logsumexp (float32 [R]) and g (float32 [R])."""
    r, v = x.shape
    out = torch.empty_like(x)
    if r:
        block = 4096
        _softmax_scale_kernel[(r, triton.cdiv(v, block))](x, lse, g, out, v, x.stride(0), out.stride(0),
                                                          BLOCK=block, num_warps=8)
    return out
