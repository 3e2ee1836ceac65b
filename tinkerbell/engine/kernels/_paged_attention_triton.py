"""The Triton kernel behind `paged_attention` (imported only where Triton is)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kernel(q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, tok_seq_ptr, tok_ctx_ptr, sm_scale,
            stride_qt, stride_qh, stride_ot, stride_oh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tab,
            GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
            PRECISION: tl.constexpr):
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


def launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           token_seq: torch.Tensor, token_ctx: torch.Tensor, block_size: int) -> torch.Tensor:
    t, h, d = q.shape
    kvh = k_cache.shape[1]
    group = h // kvh
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    _kernel[(t, kvh)](
        q, k_cache, v_cache, out, block_tables, token_seq, token_ctx, d ** -0.5,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=d, BLOCK_N=64,
        PAGE=block_size, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out
