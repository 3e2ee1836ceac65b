"""LLaDA: a masked-diffusion language model built from Llama-style blocks with **bidirectional** attention.

Parameter names are exactly those of the published checkpoints (`model.transformer.wte`, `...blocks.N.q_proj`,
`...ln_f`, `...ff_out`), so safetensors and DCP state dicts load without renaming.

One forward serves every generation algorithm (engine/diffusion.py): a padded batch of query rows, each with
its own positions, attending over optional per-row cached keys/values (the prefix and dual caches) plus the
rows' own new keys, with a key mask so padding is never attended. Logits are formed only for the rows the
caller asks for: the LM head over a 126k vocabulary is the most expensive matmul, and a diffusion step only
reads the logits of the block being unmasked.

Two paths compute the same function. `LLaDABlock.forward` is the plain one (the modules as written, the
reference the tests hold the other to). The default, `LLaDAModel._fast`, is what the sampler runs: a LLaDA
forward was ~1,750 small torch ops (float32 RMSNorms, RoPE, concatenations), so batch 1 was bound by launches
and even batch 16 spent a third of its time outside the matmuls. Per layer it is ~9 launches: the residual add
fused into each RMSNorm (kernels/fused_layer.add_rmsnorm), one q/k/v matmul, RoPE of q and k fused with the
write of k/v into a key/value buffer (rope_cache_write), one SDPA over that buffer, the output matmul, one
gate/up matmul, silu·mul in one kernel, the down matmul. cos/sin come from a table built once. On the CPU (or
without Triton) the kernels' torch forms run, which compute exactly what the plain path computes.

The key/value buffer: `past` [layers, 2, B, Lc + L, Hkv, hd] may carry room for the L new keys after the Lc
cached ones (the sampler allocates it so), and the new keys are written into that room: no per-layer
concatenation of the cached context. A `past` of only Lc keys is copied into such a buffer once per forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinkerbell.engine.kernels.fused_layer import add_rmsnorm, rope_cache_write, rope_cache_write_torch, silu_mul
from tinkerbell.engine.models.config import ModelConfig
from tinkerbell.engine.models.llama import RMSNorm, _fuse, rotate_half


class LLaDABlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.intermediate_size, bias=False)  # gate (SiLU side)
        self.up_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.ff_out = nn.Linear(cfg.intermediate_size, d, bias=False)
        self.qkv: torch.Tensor | None = None
        self.gate_up: torch.Tensor | None = None

    def fuse(self) -> None:
        """One matmul for q/k/v and one for gate/up; the named parameters become views (still load/save)."""
        with torch.no_grad():
            self.qkv = _fuse([self.q_proj, self.k_proj, self.v_proj])[0]
            self.gate_up = _fuse([self.ff_proj, self.up_proj])[0]

    def project_qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv is not None:
            q, k, v = F.linear(h, self.qkv).split(
                [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)
            return q, k, v
        return self.q_proj(h), self.k_proj(h), self.v_proj(h)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past: torch.Tensor | None, kv_out: torch.Tensor | None) -> torch.Tensor:
        """The plain path. x [B, L, d]; cos/sin [B, L, hd]; mask [B, 1, 1, Lc + L] (True = attend);
        past [2, B, Lc, Hkv, hd]."""
        cfg = self.cfg
        b, n, _ = x.shape
        q, k, v = self.project_qkv(self.attn_norm(x))
        q = q.view(b, n, cfg.num_heads, cfg.head_dim)
        k = k.view(b, n, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(b, n, cfg.num_kv_heads, cfg.head_dim)
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        if kv_out is not None:  # keys are cached after RoPE: a cached key never needs its position again
            kv_out[0].copy_(k)
            kv_out[1].copy_(v)
        if past is not None and past.shape[2] > 0:
            k = torch.cat([past[0], k], dim=1)
            v = torch.cat([past[1], v], dim=1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=cfg.num_kv_heads != cfg.num_heads)
        x = x + self.attn_out(o.transpose(1, 2).reshape(b, n, cfg.num_heads * cfg.head_dim))
        h = self.ff_norm(x)
        if self.gate_up is not None:
            gate, up = F.linear(h, self.gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.ff_proj(h), self.up_proj(h)
        return x + self.ff_out(F.silu(gate) * up)


class LLaDAModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        t = self.model.transformer = nn.Module()
        t.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        t.blocks = nn.ModuleList([LLaDABlock(cfg) for _ in range(cfg.num_layers)])
        t.ln_f = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            t.ff_out = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", cfg.inv_freq(), persistent=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin [positions, hd] in the model dtype
        self._rope_len = 0  # the longest table asked for (kept across a rebuild for another dtype or device)

    @property
    def transformer(self) -> nn.Module:
        return self.model.transformer

    def fuse_projections(self) -> None:
        for block in self.transformer.blocks:
            if block.qkv is None:
                block.fuse()

    def head_weight(self) -> torch.Tensor:
        t = self.transformer
        return t.wte.weight if self.cfg.tie_word_embeddings else t.ff_out.weight

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [..., hd] of `positions`, as HF computes them (float32 angles, rounded to `dtype`)."""
        freqs = positions[..., None].to(self.inv_freq.dtype) * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rope_table(self, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin of positions 0..length-1 (default: the config's context), built once: the same float32
        products as `rope`, so a lookup equals computing them. Grows when asked for more (the sampler asks for
        its max_context up front: a lookup past the end on the GPU would be a device-side assert)."""
        self._rope_len = length = max(length or 0, self._rope_len, self.cfg.max_position_embeddings)
        dtype = self.transformer.wte.weight.dtype
        if self._rope is None or self._rope[0].shape[0] < length or self._rope[0].dtype != dtype \
                or self._rope[0].device != self.inv_freq.device:
            self._rope = self.rope(torch.arange(length, device=self.inv_freq.device), dtype)
        return self._rope

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                past: torch.Tensor | None = None, logits_rows: torch.Tensor | None = None,
                want_kv: bool = False, plain: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids, positions [B, L]; key_mask [B, Lc + L] bool over (cached keys, then the new ones);
        past [layers, 2, B, Lc, Hkv, hd] or [layers, 2, B, Lc + L, Hkv, hd] (room for the new keys: they are
        written there) or None; logits_rows: flat indices into [B * L] to compute logits for (None: all).
        Returns (float32 logits [R, V], the new keys/values [layers, 2, B, L, Hkv, hd] if want_kv: a view of
        `past`'s room when it has one). Rows whose keys are all masked are the caller's padding; their outputs
        are garbage. `plain` runs the modules as written (the reference of the default path)."""
        if plain:
            return self._plain(ids, positions, key_mask, past, logits_rows, want_kv)
        return self._fast(ids, positions, key_mask, past, logits_rows, want_kv)

    def _plain(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, past: torch.Tensor | None,
               logits_rows: torch.Tensor | None, want_kv: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.cfg
        b, n = ids.shape
        x = self.transformer.wte(ids)
        cos, sin = self.rope(positions, x.dtype)
        mask = key_mask[:, None, None, :]
        if past is not None and past.shape[3] == key_mask.shape[1]:
            past = past[:, :, :, :key_mask.shape[1] - n]  # drop the room: this path concatenates
        kv = None
        if want_kv:
            kv = torch.empty(cfg.num_layers, 2, b, n, cfg.num_kv_heads, cfg.head_dim, dtype=x.dtype, device=x.device)
        for i, block in enumerate(self.transformer.blocks):
            x = block(x, cos, sin, mask, None if past is None else past[i], None if kv is None else kv[i])
        h = x.reshape(b * n, -1)
        if logits_rows is not None:
            h = h[logits_rows]
        logits = F.linear(self.transformer.ln_f(h), self.head_weight())
        return logits.float(), kv

    def _fast(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, past: torch.Tensor | None,
              logits_rows: torch.Tensor | None, want_kv: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.cfg
        b, n = ids.shape
        t = b * n
        keys = key_mask.shape[1]
        lc = keys - n
        hkv, hd, nh = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
        x = self.transformer.wte(ids.reshape(t))
        dtype, dev = x.dtype, x.device
        # The buffer attention reads: per layer [2, B, Lc + L, Hkv, hd], the new keys written at Lc.
        if past is not None and past.shape[3] == keys:
            buf = past
        elif past is not None:
            buf = torch.empty(cfg.num_layers, 2, b, keys, hkv, hd, dtype=dtype, device=dev)
            buf[:, :, :, :lc] = past
        elif want_kv:
            buf = torch.empty(cfg.num_layers, 2, b, n, hkv, hd, dtype=dtype, device=dev)
        else:
            buf = torch.empty(1, 2, b, n, hkv, hd, dtype=dtype, device=dev)  # one scratch, reused by every layer
        kv = buf[:, :, :, lc:] if want_kv else None
        cos_t, sin_t = self.rope_table()
        flat_pos = positions.reshape(t)
        cos, sin = cos_t[flat_pos], sin_t[flat_pos]
        slots = (torch.arange(b, device=dev)[:, None] * keys + lc + torch.arange(n, device=dev)[None, :]).reshape(t)
        # The key mask as SDPA's additive form, once per forward (SDPA would convert a boolean one in every layer:
        # the same `where(~mask, -inf, 0)`, so the numbers are the same).
        mask = torch.zeros(b, 1, 1, keys, dtype=dtype, device=dev).masked_fill_(~key_mask[:, None, None, :],
                                                                               float("-inf"))
        gqa = hkv != nh
        # The Triton RoPE kernel wants a power-of-two head_dim (LLaDA's is 128); other widths take its torch form.
        rope = rope_cache_write if hd & (hd - 1) == 0 else rope_cache_write_torch
        residual: torch.Tensor | None = None
        for i, block in enumerate(self.transformer.blocks):
            layer = buf[i if buf.shape[0] > 1 else 0]
            k_cache = layer[0].view(b * keys, hkv, hd)
            v_cache = layer[1].view(b * keys, hkv, hd)
            norm = block.attn_norm
            h, residual = add_rmsnorm(x, residual, norm.weight, norm.eps)
            q, k, v = block.project_qkv(h)
            q = rope(q.view(t, nh, hd), k.view(t, hkv, hd), v.view(t, hkv, hd), cos, sin, k_cache, v_cache, slots)
            o = F.scaled_dot_product_attention(q.view(b, n, nh, hd).transpose(1, 2), layer[0].transpose(1, 2),
                                               layer[1].transpose(1, 2), attn_mask=mask, enable_gqa=gqa)
            x = F.linear(o.transpose(1, 2).reshape(t, nh * hd), block.attn_out.weight)
            norm = block.ff_norm
            h, residual = add_rmsnorm(x, residual, norm.weight, norm.eps)
            if block.gate_up is not None:
                a = silu_mul(F.linear(h, block.gate_up))
            else:
                a = F.silu(block.ff_proj(h)) * block.up_proj(h)
            x = F.linear(a, block.ff_out.weight)
        assert residual is not None
        if logits_rows is not None:
            x, residual = x[logits_rows], residual[logits_rows]
        norm = self.transformer.ln_f
        h = add_rmsnorm(x, residual, norm.weight, norm.eps)[0]
        return F.linear(h, self.head_weight()).float(), kv


def new_llada(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> LLaDAModel:
    """An uninitialised LLaDA module on `device` (built on meta, so no time goes into random init)."""
    with torch.device("meta"):
        model = LLaDAModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.inv_freq = cfg.inv_freq().to(device)  # float32 whatever the weights' dtype, as HF keeps it
    return model


def load_llada(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> LLaDAModel:
    """Read a LLaDA checkpoint folder's safetensors into our module; every parameter must be present."""
    from safetensors import safe_open

    model = new_llada(cfg, device, dtype)
    params = dict(model.named_parameters())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    seen: set[str] = set()
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    if name in params:
                        params[name].copy_(st.get_tensor(name).to(dtype))
                        seen.add(name)
    missing = set(params) - seen
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    model.requires_grad_(False)
    return model.eval()
