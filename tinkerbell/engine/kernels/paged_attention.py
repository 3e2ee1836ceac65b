"""Attention of packed query tokens over a paged KV cache: one kernel for decode and prefill rows alike.

Every query token carries its sequence (for the block table) and its own context length (cached + new tokens
up to and including itself), so causality is just "keys before my context length" and a prefill chunk, a
prefix-cache hit and a decode token are the same case. The new tokens' K/V are written to the cache first
(`PagedKVCache.write`), then read back through the block table.

A program handles one query token and one KV head with all query heads of its GQA group, so K/V are read once
per group. That wastes tensor-core rows for short groups (padded to 16), which is cheap next to the bytes read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinkerbell.engine.kernels import use_triton


@dataclass
class PagedAttnMeta:
    """Tensor form of a batch's attention shape (device tensors, int32)."""

    block_tables: torch.Tensor  # [S, max_blocks]: block ids of each sequence (unused entries arbitrary)
    token_seq: torch.Tensor  # [T]: which row of block_tables each query token belongs to
    token_ctx: torch.Tensor  # [T]: keys visible to the token (its position + 1)
    max_ctx: int  # host-side upper bound of token_ctx (sizes the torch path; the kernel ignores it)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttnMeta,
                    block_size: int) -> torch.Tensor:
    """q [T, H, D]; caches [slots, KVH, D] → out [T, H, D]."""
    d = q.shape[-1]
    if use_triton(q) and d >= 16 and d & (d - 1) == 0:
        return _paged_attention_triton(q, k_cache, v_cache, meta, block_size)
    return paged_attention_torch(q, k_cache, v_cache, meta, block_size)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttnMeta,
                          block_size: int) -> torch.Tensor:
    """Same function in plain torch: every token gathers its keys up to `max_ctx` and masks the rest."""
    t, h, d = q.shape
    kvh = k_cache.shape[1]
    pos = torch.arange(meta.max_ctx, device=q.device)
    tables = meta.block_tables.long()[meta.token_seq.long()]  # [T, max_blocks]
    blocks = tables.gather(1, (pos // block_size).clamp(max=tables.shape[1] - 1).expand(t, -1))
    slots = blocks * block_size + pos % block_size  # [T, max_ctx]
    visible = pos[None, :] < meta.token_ctx.long()[:, None]
    slots = torch.where(visible, slots, torch.zeros_like(slots))
    k = k_cache[slots].to(q.dtype)  # [T, C, KVH, D]
    v = v_cache[slots].to(q.dtype)
    qg = q.view(t, kvh, h // kvh, d)
    scores = torch.einsum("tkgd,tckd->tkgc", qg.float(), k.float()) / d**0.5
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("tkgc,tckd->tkgd", scores.softmax(-1), v.float())
    return out.reshape(t, h, d).to(q.dtype)


def _paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttnMeta,
                            block_size: int) -> torch.Tensor:
    from tinkerbell.engine.kernels._paged_attention_triton import launch

    return launch(q, k_cache, v_cache, meta.block_tables, meta.token_seq, meta.token_ctx, block_size)


def meta_for_spans(spans: list, device: torch.device | str) -> PagedAttnMeta:
    """Metadata for a batch described by `SeqSpan`s (each with a block table), built on the host in one go."""
    import numpy as np

    width = max(len(s.block_table) for s in spans)
    tables = np.zeros((len(spans), width), dtype=np.int32)
    seq = np.empty(sum(s.length for s in spans), dtype=np.int32)
    ctx = np.empty_like(seq)
    for i, s in enumerate(spans):
        tables[i, :len(s.block_table)] = s.block_table
        seq[s.start:s.end] = i
        ctx[s.start:s.end] = np.arange(s.cached_len + 1, s.context_len + 1, dtype=np.int32)
    return PagedAttnMeta(block_tables=torch.from_numpy(tables).to(device), token_seq=torch.from_numpy(seq).to(device),
                         token_ctx=torch.from_numpy(ctx).to(device), max_ctx=max(s.context_len for s in spans))
