"""Decoder-only transformer of the Llama family: Llama 2/3 (incl. SmolLM2), Qwen2/2.5 and Qwen3.

The variants differ only in flags of `ModelConfig` (q/k/v bias, Qwen3's q/k RMSNorm, Llama-3.1 RoPE scaling).
One forward takes a packed batch of many sequences (no padding); `BatchContext` says where each sequence
starts, what it has cached and which LoRA adapter each token uses.

Tensor parallel (`tp`, see engine/tp/shard.py): the layers are built at the rank's local sizes (a `local_cfg`
with local head, kv-head, intermediate and vocabulary counts) and the model issues Megatron's collectives:
`copy_to_tp` where the replicated activation enters column-parallel layers (attention, MLP, LM head inputs),
`reduce_from_tp` after o_proj and down_proj (their LoRA deltas join the partial sum first, so LoRA adds no
collective), and a vocab-parallel embedding. `tp=None` is the plain path: no collective, nothing changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinkerbell.engine.batch import BatchContext
from tinkerbell.engine.kernels.fused_layer import add_rmsnorm, rope_cache_write, silu_mul
from tinkerbell.engine.kernels.gemv import linear
from tinkerbell.engine.kernels.paged_attention import paged_attention
from tinkerbell.engine.models.config import ModelConfig
from tinkerbell.engine.tp.group import TPGroup, copy_to_tp, gather_last_dim, reduce_from_tp
from tinkerbell.engine.tp.shard import ShardInfo, plan_shard


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as HF does, so bf16 models match their reference.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _lora(ctx: BatchContext, key: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return ctx.lora.apply(key, x, out) if ctx.lora is not None else out


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears over the same input; each linear's parameters become views
    into it, so the HF names still load, train and save, and the base weights exist once."""
    weight = torch.cat([m.weight.detach() for m in linears])
    has_bias = linears[0].bias is not None
    bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
    start = 0
    for m in linears:
        n = m.out_features
        m.weight = nn.Parameter(weight[start:start + n], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias[start:start + n], requires_grad=m.bias.requires_grad)
        start += n
    return weight, bias


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TPGroup | None = None):
        """`cfg` gives the layer's (local, under tp) head counts."""
        super().__init__()
        self.cfg, self.layer_idx, self.tp = cfg, layer_idx, tp
        self.prefix = f"model.layers.{layer_idx}.self_attn."
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by fuse()

    def fuse(self) -> None:
        with torch.no_grad():
            self.qkv = _fuse([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        cfg, p = self.cfg, self.prefix
        t = x.shape[0]
        if self.tp is not None:
            x = copy_to_tp(x, self.tp)
        if self.qkv is not None:
            q, k, v = linear(x, *self.qkv).split(
                [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = _lora(ctx, p + "q_proj", x, q).view(t, cfg.num_heads, cfg.head_dim)
        k = _lora(ctx, p + "k_proj", x, k).view(t, cfg.num_kv_heads, cfg.head_dim)
        v = _lora(ctx, p + "v_proj", x, v).view(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cache = ctx.kv_cache
        if ctx.attn is not None and cache is not None:
            # Fast path: RoPE and the cache write in one launch, then paged attention over the cache.
            assert ctx.slot_mapping is not None
            layer = self.layer_idx
            q = rope_cache_write(q, k, v, cos, sin, cache.k[layer], cache.v[layer], ctx.slot_mapping)
            attn = paged_attention(q, cache.k[layer], cache.v[layer], ctx.attn, cache.block_size)
        else:
            c, s = cos[:, None, :], sin[:, None, :]
            q = q * c + rotate_half(q) * s
            k = k * c + rotate_half(k) * s
            attn = attend(q, k, v, ctx, self.layer_idx)
        o = attn.reshape(t, cfg.num_heads * cfg.head_dim)
        out = _lora(ctx, p + "o_proj", o, linear(o, self.o_proj.weight, self.o_proj.bias, wins_alone=True))
        return out if self.tp is None else reduce_from_tp(out, self.tp)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: BatchContext, layer: int) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached + new keys (plain-torch reference path)."""
    cache = ctx.kv_cache
    if cache is not None:
        assert ctx.slot_mapping is not None
        cache.write(layer, ctx.slot_mapping, k, v)
    if ctx.attn is not None:
        assert cache is not None, "paged attention metadata without a KV cache"
        return paged_attention(q, cache.k[layer], cache.v[layer], ctx.attn, cache.block_size)
    groups = q.shape[1] // k.shape[1]
    outs = []
    for span in ctx.spans:
        qs = q[span.start : span.end].transpose(0, 1)  # [H, L, D]
        if cache is not None and span.cached_len > 0:
            assert span.block_table is not None
            ks, vs = cache.gather(layer, span.block_table, span.context_len)
        else:
            ks, vs = k[span.start : span.end], v[span.start : span.end]
        ks = ks.transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = vs.transpose(0, 1).repeat_interleave(groups, dim=0)
        if span.cached_len == 0:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        else:
            # Query i (absolute position cached_len + i) sees keys 0..cached_len + i.
            qpos = torch.arange(span.cached_len, span.context_len, device=q.device)[:, None]
            kpos = torch.arange(span.context_len, device=q.device)[None, :]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=kpos <= qpos)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs, dim=0)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TPGroup | None = None):
        super().__init__()
        self.tp = tp
        self.prefix = f"model.layers.{layer_idx}.mlp."
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by fuse()

    def fuse(self) -> None:
        with torch.no_grad():
            self.gate_up = _fuse([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        p = self.prefix
        if self.tp is not None:
            x = copy_to_tp(x, self.tp)
        if self.gate_up is not None:
            gu = linear(x, *self.gate_up)
            g, u = gu.chunk(2, dim=-1)
        else:
            gu, (g, u) = None, (self.gate_proj(x), self.up_proj(x))
        g2 = _lora(ctx, p + "gate_proj", x, g)
        u2 = _lora(ctx, p + "up_proj", x, u)
        # The fused activation reads [g | u] back from the fused output: valid when LoRA added in place (the
        # gathered kernels do; the segment loop returns new tensors).
        if gu is not None and ctx.attn is not None and g2 is g and u2 is u:
            h = silu_mul(gu)
        else:
            g, u = g2, u2
            h = F.silu(g) * u
        out = _lora(ctx, p + "down_proj", h, linear(h, self.down_proj.weight, self.down_proj.bias))
        return out if self.tp is None else reduce_from_tp(out, self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TPGroup | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer_idx, tp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Parameter names equal HF's (`model.layers.N...`, `lm_head.weight`), so safetensors load by name.

    `cfg` stays the FULL model's config (request validation, vocabulary size); under `tp`, `shard` holds this
    rank's local sizes (KV-cache kv heads, LoRA shapes: `shard.local_cfg`) and the layers are built at them."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.shard: ShardInfo | None = plan_shard(cfg, tp.rank, tp.world) if tp is not None else None
        local = self.shard.local_cfg if self.shard is not None else cfg
        self.model = Backbone(local, tp)
        self.lm_head = nn.Linear(cfg.hidden_size, local.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", cfg.inv_freq(), persistent=False)
        self.rope_cache: torch.Tensor | None = None  # [positions, 2, head_dim] cos/sin; see cache_rope()

    def cache_rope(self, max_positions: int, dtype: torch.dtype) -> None:
        """Precompute cos/sin of every position below `max_positions` for the sampler's fast path, which then
        looks them up in one gather instead of recomputing them each step (seven small launches). The same
        elementwise ops as `rope`, so the values are identical."""
        cos, sin = self.rope(torch.arange(max_positions, device=self.inv_freq.device), dtype)
        self.rope_cache = torch.stack([cos, sin], dim=1)

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up into one matmul each (the parameters stay, as views). Call after loading and
        after any move: `.to()` would give the views their own storage again."""
        for layer in self.model.layers:
            if layer.self_attn.qkv is None:
                layer.self_attn.fuse()
            if layer.mlp.gate_up is None:
                layer.mlp.fuse()

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @property
    def local_cfg(self) -> ModelConfig:
        """The layers' shapes: `cfg` itself without tp, the rank's local sizes with it."""
        return self.shard.local_cfg if self.shard is not None else self.cfg

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; vocab-parallel under tp: each rank looks up the ids in its range, zeros the rest,
        and the all-reduce leaves every rank with every row."""
        if self.shard is None or self.tp.world == 1:  # one rank holds the whole vocabulary: a plain lookup
            return self.model.embed_tokens(input_ids)
        s = self.shard
        local = input_ids - s.vocab_start
        outside = (local < 0) | (local >= s.vocab_size)
        x = self.model.embed_tokens(local.masked_fill(outside, 0))
        return reduce_from_tp(x.masked_fill(outside[:, None], 0), self.tp)

    def hidden_states(self, input_ids: torch.Tensor, ctx: BatchContext, checkpoint_layers: bool = False) -> torch.Tensor:
        """Final-norm hidden states [T, hidden] of the packed batch (logits are left to the caller)."""
        x = self.embed(input_ids)
        fast = ctx.attn is not None and not torch.is_grad_enabled()
        table = self.rope_cache
        if fast and table is not None and table.dtype == x.dtype:
            # The fast path's positions are below the sampler's context limit, which sized the table.
            cs = table[ctx.positions(input_ids.device)]
            cos, sin = cs[:, 0], cs[:, 1]
        else:
            cos, sin = self.rope(ctx.positions(input_ids.device), x.dtype)
        if fast:
            return self._fused_hidden_states(x, cos, sin, ctx)
        for layer in self.model.layers:
            if checkpoint_layers and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, ctx, use_reentrant=False)
            else:
                x = layer(x, cos, sin, ctx)
        return self.model.norm(x)

    def _fused_hidden_states(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             ctx: BatchContext) -> torch.Tensor:
        """The sampler's fast path: each residual add fused into the RMSNorm that follows it (same function
        as the layer loop above, fewer launches)."""
        residual = None
        for layer in self.model.layers:
            norm = layer.input_layernorm
            h, residual = add_rmsnorm(x, residual, norm.weight, norm.eps)
            x = layer.self_attn(h, cos, sin, ctx)
            norm = layer.post_attention_layernorm
            h, residual = add_rmsnorm(x, residual, norm.weight, norm.eps)
            x = layer.mlp(h, ctx)
        norm = self.model.norm
        return add_rmsnorm(x, residual, norm.weight, norm.eps)[0]

    def logits(self, hidden: torch.Tensor, ctx: BatchContext | None = None, row_offset: int = 0) -> torch.Tensor:
        """Logits of rows of `hidden` (rows start at `row_offset` of the batch, for LoRA on the head): the full
        vocabulary on every rank (gathered under tp, outside autograd: the sampler samples from them)."""
        out = self.local_logits(hidden, ctx, row_offset)
        if self.shard is None:
            return out
        return gather_last_dim(out, self.tp, list(self.shard.vocab_sizes))

    def local_logits(self, hidden: torch.Tensor, ctx: BatchContext | None = None,
                     row_offset: int = 0) -> torch.Tensor:
        """This rank's vocabulary columns [shard.vocab_start, shard.vocab_end) (all of them without tp), with
        autograd: training's vocab-parallel log-softmax reads these, never the gathered logits."""
        if self.tp is not None:
            hidden = copy_to_tp(hidden, self.tp)
        out = linear(hidden, self.lm_head.weight, wins_alone=True)
        if ctx is not None and ctx.lora is not None:
            out = ctx.lora.apply("lm_head", hidden, out, row_offset=row_offset)
        return out

    def forward(self, input_ids: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, ctx), ctx)
