"""LoRA adapters and how one forward applies many of them (one per token segment).

Module keys are the HF parameter prefixes ("model.layers.3.self_attn.q_proj", "lm_head"), so PEFT's
`base_model.model.<key>.lora_A.weight` maps one-to-one onto ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tinkerbell.engine.models.config import ModelConfig

if TYPE_CHECKING:
    from tinkerbell.engine.tp.shard import ShardInfo

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_KEY = "lm_head"
# Tinker's hosted service and the "LoRA without regret" recipe use a fixed alpha of 32 (scale = 32 / rank).
DEFAULT_LORA_ALPHA = 32.0


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float = DEFAULT_LORA_ALPHA
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def target_keys(self, cfg: ModelConfig) -> list[str]:
        keys: list[str] = []
        for i in range(cfg.num_layers):
            if self.train_attn:
                keys += [f"model.layers.{i}.self_attn.{m}" for m in ATTN_MODULES]
            if self.train_mlp:
                keys += [f"model.layers.{i}.mlp.{m}" for m in MLP_MODULES]
        if self.train_unembed:
            keys.append(UNEMBED_KEY)
        return keys

    def target_module_names(self) -> list[str]:
        """Short names as PEFT's `target_modules` lists them."""
        names: list[str] = []
        if self.train_attn:
            names += list(ATTN_MODULES)
        if self.train_mlp:
            names += list(MLP_MODULES)
        if self.train_unembed:
            names.append(UNEMBED_KEY)
        return names


def module_shape(cfg: ModelConfig, key: str) -> tuple[int, int]:
    """(in_features, out_features) of the linear layer named by `key`. Under tensor parallelism, the full
    model's config gives the whole adapter's shapes and `shard.local_cfg` (`CausalLM.local_cfg`) a rank's."""
    name = key.rsplit(".", 1)[-1]
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "q_proj": (cfg.hidden_size, q_out),
        "k_proj": (cfg.hidden_size, kv_out),
        "v_proj": (cfg.hidden_size, kv_out),
        "o_proj": (q_out, cfg.hidden_size),
        "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "down_proj": (cfg.intermediate_size, cfg.hidden_size),
        "lm_head": (cfg.hidden_size, cfg.vocab_size),
    }
    if name not in shapes:
        raise KeyError(f"not a LoRA target: {key}")
    return shapes[name]


@dataclass
class AdapterWeights:
    """One adapter: for each target key, A [rank, in] and B [out, rank]."""

    spec: LoraSpec
    a: dict[str, torch.Tensor] = field(default_factory=dict)
    b: dict[str, torch.Tensor] = field(default_factory=dict)
    # A training run's masters: the one buffer that every A and B is a view of (training_params.pack).
    flat: torch.Tensor | None = None

    @classmethod
    def init(
        cls,
        cfg: ModelConfig,
        spec: LoraSpec,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        shard: "ShardInfo | None" = None,
    ) -> "AdapterWeights":
        """PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so a fresh adapter changes nothing.

        With a tensor-parallel `shard` (and `cfg` the full model's), every rank draws the whole adapter from the
        same seed and keeps its piece, so an adapter initialised at TP T equals the one at TP 1 exactly."""
        if shard is not None:
            if seed is None:
                raise ValueError("a sharded adapter needs an explicit seed (every rank must draw the same one)")
            from tinkerbell.engine.tp.shard import shard_adapter

            return shard_adapter(cls.init(cfg, spec, seed, dtype, device), shard)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed if seed is not None else torch.seed())
        out = cls(spec=spec)
        for key in spec.target_keys(cfg):
            fan_in, fan_out = module_shape(cfg, key)
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a=sqrt(5) gives 1/sqrt(fan_in)
            a = (torch.rand(spec.rank, fan_in, generator=gen) * 2 - 1) * bound
            out.a[key] = a.to(device=device, dtype=dtype)
            out.b[key] = torch.zeros(fan_out, spec.rank, device=device, dtype=dtype)
        return out

    def parameters(self) -> list[torch.Tensor]:
        return [t for k in self.a for t in (self.a[k], self.b[k])]

    def detached_copy(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "AdapterWeights":
        def cp(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device or t.device, dtype=dtype or t.dtype).clone()

        return AdapterWeights(
            spec=self.spec, a={k: cp(v) for k, v in self.a.items()}, b={k: cp(v) for k, v in self.b.items()}
        )


@dataclass
class LoraSegment:
    """Rows [start, end) of the packed batch use `weights` (None: base model only)."""

    start: int
    end: int
    weights: AdapterWeights | None


@dataclass
class LoraBatch:
    segments: list[LoraSegment]

    def apply(self, key: str, x: torch.Tensor, out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
        """out + Σ_segments scale · x_seg Aᵀ Bᵀ, for the rows of x (which start at `row_offset` of the batch).

        Plain-torch segment loop: the reference for the gathered (SGMV-style) GPU kernels. Built by
        concatenation rather than in-place writes so autograd flows to each segment's own A and B.
        """
        n = x.shape[0]
        pieces: list[torch.Tensor] = []
        cursor = 0
        touched = False
        for seg in self.segments:
            s, e = max(seg.start - row_offset, 0), min(seg.end - row_offset, n)
            if e <= s:
                continue
            w = seg.weights
            if w is None or key not in w.a:
                continue
            if s > cursor:
                pieces.append(out[cursor:s])
            a, b = w.a[key], w.b[key]
            xs = x[s:e].to(a.dtype)
            delta = (xs @ a.t()) @ b.t() * w.spec.scale
            pieces.append(out[s:e] + delta.to(out.dtype))
            cursor = e
            touched = True
        if not touched:
            return out
        if cursor < n:
            pieces.append(out[cursor:])
        return torch.cat(pieces, dim=0)
