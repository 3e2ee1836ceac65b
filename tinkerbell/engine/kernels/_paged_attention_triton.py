"""The Triton kernel behind `paged_attention` (imported only where Triton is)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinkerbell.engine.kernels import use_pdl
from tinkerbell.engine.kernels._pdl_triton import pdl_enter


@triton.jit
def _kernel(q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, tok_seq_ptr, tok_ctx_ptr, sm_scale,
            stride_qt, stride_qh, stride_ot, stride_oh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tab,
            GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
            PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tok_seq_ptr + t).to(tl.int64)
    ctx = tl.load(tok_ctx_ptr + t)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gmask = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for start in range(0, ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pmask = pos < ctx
        blk = tl.load(tables_ptr + seq * stride_tab + pos // PAGE, mask=pmask, other=0).to(tl.int64)
        slot = blk * PAGE + pos % PAGE
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=pmask[:, None],
                    other=0.0)
        s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=PRECISION) * sm_scale
        s = tl.where(pmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=pmask[:, None],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + t * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=gmask[:, None])


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, part_ptr, ml_ptr, tables_ptr, tok_seq_ptr, tok_ctx_ptr, sm_scale,
                  stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tab,
                  GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, H: tl.constexpr, SPLITS: tl.constexpr,
                  BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
                  PDL: tl.constexpr):
    """One split of the context of one (token, KV head): unnormalised partial output and its (max, sum)."""
    pdl_enter(PDL)
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    seq = tl.load(tok_seq_ptr + t).to(tl.int64)
    ctx = tl.load(tok_ctx_ptr + t)
    chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, ctx)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gmask = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pmask = pos < hi
        blk = tl.load(tables_ptr + seq * stride_tab + pos // PAGE, mask=pmask, other=0).to(tl.int64)
        slot = blk * PAGE + pos % PAGE
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=pmask[:, None],
                    other=0.0)
        s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=PRECISION) * sm_scale
        s = tl.where(pmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=pmask[:, None],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new
    # Layout [T, H, SPLITS, D] and [T, H, SPLITS, 2]; an empty split leaves m = -inf, l = 0.
    row = (t * H + heads).to(tl.int64) * SPLITS + sp
    tl.store(part_ptr + row[:, None] * D + d[None, :], acc, mask=gmask[:, None])
    tl.store(ml_ptr + row * 2, m_i, mask=gmask)
    tl.store(ml_ptr + row * 2 + 1, l_i, mask=gmask)


@triton.jit
def _reduce_kernel(part_ptr, ml_ptr, o_ptr, stride_ot, stride_oh, H: tl.constexpr, SPLITS: tl.constexpr,
                   D: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    row = (t * H + h).to(tl.int64) * SPLITS + sp
    m = tl.load(ml_ptr + row * 2)
    l = tl.load(ml_ptr + row * 2 + 1)
    m_all = tl.max(m, 0)
    w = tl.where(l > 0, tl.exp(m - m_all), 0.0)
    acc = tl.load(part_ptr + row[:, None] * D + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def num_splits(tokens: int, kv_heads: int) -> int:
    """Context splits per (token, KV head): enough programs to cover the SMs when the batch is small (a decode
    of one sequence has only KVH programs otherwise). Depends on shapes only, so a captured graph keeps it."""
    programs = tokens * kv_heads
    for splits in (16, 8, 4, 2):
        if programs * splits <= 512:
            return splits
    return 1


def launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           token_seq: torch.Tensor, token_ctx: torch.Tensor, block_size: int, splits: int | None = None) -> torch.Tensor:
    t, h, d = q.shape
    kvh = k_cache.shape[1]
    group = h // kvh
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    splits = num_splits(t, kvh) if splits is None else splits
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    gp = max(16, triton.next_power_of_2(group))
    pdl = use_pdl(q)
    if splits > 1:
        part = torch.empty((t, h, splits, d), dtype=torch.float32, device=q.device)
        ml = torch.empty((t, h, splits, 2), dtype=torch.float32, device=q.device)
        _split_kernel[(t, kvh, splits)](
            q, k_cache, v_cache, part, ml, block_tables, token_seq, token_ctx, d ** -0.5,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            block_tables.stride(0), GROUP=group, GP=gp, D=d, H=h, SPLITS=splits, BLOCK_N=32, PAGE=block_size,
            PRECISION=precision, num_warps=4, PDL=pdl, launch_pdl=pdl)
        _reduce_kernel[(t, h)](part, ml, out, out.stride(0), out.stride(1), H=h, SPLITS=splits, D=d, num_warps=1,
                                 PDL=pdl, launch_pdl=pdl)
        return out
    _kernel[(t, kvh)](
        q, k_cache, v_cache, out, block_tables, token_seq, token_ctx, d ** -0.5,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        GROUP=group, GP=gp, D=d, BLOCK_N=64,
        PAGE=block_size, PRECISION=precision,
        num_warps=4, PDL=pdl, launch_pdl=pdl,
    )
    return out
