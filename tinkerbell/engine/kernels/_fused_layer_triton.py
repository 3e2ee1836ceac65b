"""Triton kernels behind kernels/fused_layer.py (imported only where Triton is). Each rounds to the model dtype
where the torch form does, so bf16 outputs match it to the last bit in most elements."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinkerbell.engine.kernels import use_pdl
from tinkerbell.engine.kernels._pdl_triton import pdl_enter


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, s_ptr, w_ptr, out_ptr, rstd_ptr, N, eps, stride_x, stride_r, stride_s,
                        stride_o, HAS_RES: tl.constexpr, STORE_RSTD: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
    # s = residual + x goes to s_ptr (the residual itself when decoding: in place); training also keeps 1/rms.
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # The sum is rounded to the model dtype, as `residual + x` in the model dtype is.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(s_ptr + row * stride_s + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / N + eps)
    if STORE_RSTD:
        tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def norm_launch(n: int) -> dict:
    return {"BLOCK": triton.next_power_of_2(n), "num_warps": 8 if n >= 4096 else 4}


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    t, n = x.shape
    out = torch.empty(t, n, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if t:
        res = x if residual is None else residual
        pdl = use_pdl(x)
        _add_rmsnorm_kernel[(t,)](x, res, res, weight, out, out, n, eps, x.stride(0), res.stride(0),
                                  res.stride(0), out.stride(0), HAS_RES=residual is not None, STORE_RSTD=False,
                                  PDL=pdl, launch_pdl=pdl, **norm_launch(n))
    return out, (x if residual is None else residual)


@triton.jit
def rotate_heads(src, src_h, dst, dst_h, c, s, NH: tl.constexpr, NHP: tl.constexpr, HALF: tl.constexpr):
    """RoPE of one token's NH heads (padded to NHP): src/dst point at the token's first head, heads `*_h` apart;
    c/s are the [HALF] cos/sin of its angle."""
    i = tl.arange(0, HALF)
    h = tl.arange(0, NHP)
    m = (h < NH)[:, None]
    x = src + h[:, None] * src_h + i[None, :]
    x1 = tl.load(x, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=m, other=0.0).to(tl.float32)
    o = dst + h[:, None] * dst_h + i[None, :]
    tl.store(o, (x1 * c[None, :] - x2 * s[None, :]).to(dst.dtype.element_ty), mask=m)
    tl.store(o + HALF, (x2 * c[None, :] + x1 * s[None, :]).to(dst.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, qo_ptr,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                 stride_cs, stride_ch, stride_ot, stride_oh,
                 H: tl.constexpr, KVH: tl.constexpr, HP: tl.constexpr, KP: tl.constexpr, HALF: tl.constexpr,
                 PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HALF)
    c = tl.load(cos_ptr + t * stride_ct + i).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_ct + i).to(tl.float32)
    rotate_heads(q_ptr + t * stride_qt, stride_qh, qo_ptr + t * stride_ot, stride_oh, c, s, H, HP, HALF)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    rotate_heads(k_ptr + t * stride_kt, stride_kh, kc_ptr + slot * stride_cs, stride_ch, c, s, KVH, KP, HALF)
    kh = tl.arange(0, KP)
    km = (kh < KVH)[:, None]
    d = tl.arange(0, 2 * HALF)
    v = tl.load(v_ptr + t * stride_vt + kh[:, None] * stride_vh + d[None, :], mask=km, other=0.0)
    tl.store(vc_ptr + slot * stride_cs + kh[:, None] * stride_ch + d[None, :], v.to(vc_ptr.dtype.element_ty),
             mask=km)


def rope_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    t, h, d = q.shape
    kvh = k.shape[1]
    out = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
    assert k_cache.stride() == v_cache.stride() and cos.stride() == sin.stride()
    assert d & (d - 1) == 0, "head_dim must be a power of two for the Triton RoPE path"
    if t:
        pdl = use_pdl(q)
        _rope_kernel[(t,)](q, k, v, cos, sin, k_cache, v_cache, slot_mapping, out,
                           q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           cos.stride(0), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
                           H=h, KVH=kvh, HP=triton.next_power_of_2(h), KP=triton.next_power_of_2(kvh),
                           HALF=d // 2, num_warps=4, PDL=pdl, launch_pdl=pdl)
    return out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, N, stride_g, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gu_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_g + N + cols, mask=mask, other=0.0)
    # F.silu rounds to the model dtype before the product, as here.
    a = (g / (1.0 + tl.exp(-g))).to(gu_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, (a.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    t, n2 = gate_up.shape
    n = n2 // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = 1024
        pdl = use_pdl(gate_up)
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), out.stride(0),
                                                     BLOCK=block, num_warps=4, PDL=pdl,
                                                     launch_pdl=pdl)
    return out
