"""Model hyper-parameters read straight from an HF `config.json` (no transformers import on the hot path)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHS = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "llada": "llada",  # masked-diffusion LM (bidirectional Llama-style blocks; models/llada.py)
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one this server implements."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v (Qwen2 always, Llama when `attention_bias`)
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    mask_token_id: int | None = None  # diffusion LMs only: the [MASK] id generation starts from

    @property
    def is_diffusion(self) -> bool:
        return self.arch == "llada"

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        model_type = cfg.get("model_type", "")
        if model_type == "llada":
            return cls._from_llada(cfg)
        arch = SUPPORTED_ARCHS.get(model_type)
        if arch is None:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {sorted(SUPPORTED_ARCHS)}"
            )
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or hidden // heads
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or None
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        if rope and rope.get("rope_type", "default") not in ("default", None):
            scaling = dict(rope)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (only 'llama3')")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            arch=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
            o_bias=False if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=arch == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )

    @classmethod
    def _from_llada(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """LLaDA's OLMo-style config (d_model, n_heads, ...). Only the Llama-block variant LLaDA ships is
        implemented; flags that would change the numerics are refused rather than ignored."""
        for flag in ("include_bias", "input_emb_norm", "include_qkv_bias"):
            if cfg.get(flag):
                raise UnsupportedModelError(f"LLaDA config with {flag}=true is not supported")
        if cfg.get("clip_qkv") is not None:
            raise UnsupportedModelError("LLaDA config with clip_qkv is not supported")
        if cfg.get("block_type", "llama") != "llama":
            raise UnsupportedModelError(f"LLaDA block_type {cfg.get('block_type')!r} is not supported")
        if cfg.get("mask_token_id") is None:
            raise UnsupportedModelError("LLaDA config has no mask_token_id")
        hidden, heads = int(cfg["d_model"]), int(cfg["n_heads"])
        mlp = cfg.get("mlp_hidden_size") or int(cfg.get("mlp_ratio", 4)) * hidden
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            arch="llada",
            # The embedding (and head) may be padded beyond the tokenizer's vocabulary; logits span all of it.
            vocab_size=int(cfg.get("embedding_size") or cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(mlp),
            num_layers=int(cfg["n_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("n_kv_heads") or heads),
            head_dim=hidden // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=None,
            max_position_embeddings=int(cfg.get("max_sequence_length", 4096)),
            tie_word_embeddings=bool(cfg.get("weight_tying", False)),
            attention_bias=False,
            o_bias=False,
            mlp_bias=False,
            qk_norm=False,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            mask_token_id=int(cfg["mask_token_id"]),
        )

    def inv_freq(self) -> "Any":
        """RoPE inverse frequencies, with Llama-3.1 scaling when configured."""
        import torch

        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if self.rope_scaling is None:
            return inv
        s = self.rope_scaling
        factor = float(s["factor"])
        low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
        old_ctx = float(s.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, inv_l)
