"""How each tensor of the model (and of its LoRA adapters) is split over the T ranks of a tensor-parallel group.

Megatron's layout: q/k/v and gate/up are column-parallel (rank r keeps a contiguous range of their output rows),
o/down are row-parallel (a range of their input columns: each rank's product is a partial sum, all-reduced once
per block); the embedding and the LM head are vocab-parallel (T contiguous vocabulary ranges, uneven when the
vocabulary does not divide); norms are replicated. Biases of column layers are split with their rows; a row
layer's bias is kept by rank 0 only (zeros elsewhere), so the all-reduce adds it exactly once.

KV heads are split when `num_kv_heads >= T`. With fewer KV heads than ranks, each is REPLICATED on T / num_kv_heads
ranks: rank r keeps kv head r // (T // num_kv_heads), the one its own q heads (a contiguous range of num_heads / T)
use under grouped-query attention, so attention never needs another rank's keys.

LoRA follows the base layer so its path adds no collective: on a column layer A [r, in] is whole (replicated) and
B [out, r] is split like the layer's rows; on a row layer A is split like the layer's columns and B is whole, and
its delta joins the partial sum before the layer's all-reduce. A checkpoint is always the whole adapter:
`shard_adapter` cuts one for a rank, `gather_lora_tensors` puts the pieces back together on rank 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from tinkerbell.engine.models.config import ModelConfig

if TYPE_CHECKING:
    from tinkerbell.engine.lora import AdapterWeights
    from tinkerbell.engine.tp.group import TPGroup

COLUMN_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
ROW_MODULES = ("o_proj", "down_proj")
VOCAB_PARAMS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class ShardInfo:
    """One rank's share of the model: its local sizes and where they sit in the full tensors."""

    rank: int
    world: int
    cfg: ModelConfig  # the full model
    local_cfg: ModelConfig  # the same with local head / kv-head / intermediate / vocab counts (layer shapes)
    num_heads: int  # local q heads: global heads [rank * num_heads, (rank + 1) * num_heads)
    num_kv_heads: int  # local kv heads: global kv heads [kv_head_start, kv_head_start + num_kv_heads)
    kv_head_start: int
    kv_replicas: int  # ranks holding each of this rank's kv heads (1: split; T / num_kv_heads: replicated)
    intermediate_size: int  # local MLP width: global [rank * intermediate_size, ...)
    vocab_start: int
    vocab_end: int
    vocab_sizes: tuple[int, ...]  # every rank's vocabulary share, in rank order (for gathering logits)

    @property
    def vocab_size(self) -> int:
        return self.vocab_end - self.vocab_start

    @property
    def head_dim(self) -> int:
        return self.cfg.head_dim

    def out_range(self, module: str) -> tuple[int, int]:
        """The rows of a column-parallel layer's weight (its output features) this rank keeps."""
        hd = self.cfg.head_dim
        if module == "q_proj":
            return self.rank * self.num_heads * hd, (self.rank + 1) * self.num_heads * hd
        if module in ("k_proj", "v_proj"):
            return self.kv_head_start * hd, (self.kv_head_start + self.num_kv_heads) * hd
        if module in ("gate_proj", "up_proj"):
            return self.rank * self.intermediate_size, (self.rank + 1) * self.intermediate_size
        if module == "lm_head":
            return self.vocab_start, self.vocab_end
        raise KeyError(f"{module} is not a column-parallel layer")

    def in_range(self, module: str) -> tuple[int, int]:
        """The columns of a row-parallel layer's weight (its input features) this rank keeps."""
        if module == "o_proj":
            return self.out_range("q_proj")
        if module == "down_proj":
            return self.out_range("gate_proj")
        raise KeyError(f"{module} is not a row-parallel layer")


def vocab_ranges(vocab_size: int, world: int) -> list[tuple[int, int]]:
    """T contiguous ranges covering [0, vocab_size); the first vocab_size % T are one longer."""
    base, extra = divmod(vocab_size, world)
    out, start = [], 0
    for r in range(world):
        n = base + (1 if r < extra else 0)
        out.append((start, start + n))
        start += n
    return out


def plan_shard(cfg: ModelConfig, rank: int, world: int) -> ShardInfo:
    """Rank `rank`'s shard of `cfg` over `world` ranks; a ValueError naming the config field when the model cannot
    be split that way."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"tensor-parallel rank {rank} of {world} is out of range")
    if cfg.is_diffusion:
        raise ValueError("tensor parallelism (--tp > 1) is not supported for diffusion models (LLaDA); use --tp 1")
    t = world
    if cfg.num_heads % t:
        raise ValueError(f"--tp {t} must divide the model's num_attention_heads ({cfg.num_heads}); "
                         f"pick a --tp that divides it")
    if cfg.num_kv_heads >= t:
        if cfg.num_kv_heads % t:
            raise ValueError(f"--tp {t} must divide the model's num_key_value_heads ({cfg.num_kv_heads}) "
                             "when it is at least --tp")
        local_kv, kv_start, replicas = cfg.num_kv_heads // t, rank * (cfg.num_kv_heads // t), 1
    else:
        if t % cfg.num_kv_heads:
            raise ValueError(f"the model's num_key_value_heads ({cfg.num_kv_heads}) must divide --tp {t} "
                             "when it is below --tp (each kv head is replicated on --tp / kv_heads ranks)")
        replicas = t // cfg.num_kv_heads
        local_kv, kv_start = 1, rank // replicas
    if cfg.intermediate_size % t:
        raise ValueError(f"--tp {t} must divide the model's intermediate_size ({cfg.intermediate_size})")
    if cfg.vocab_size < t:
        raise ValueError(f"the model's vocab_size ({cfg.vocab_size}) is below --tp {t}")
    ranges = vocab_ranges(cfg.vocab_size, t)
    v0, v1 = ranges[rank]
    local_cfg = dataclasses.replace(cfg, num_heads=cfg.num_heads // t, num_kv_heads=local_kv,
                                    intermediate_size=cfg.intermediate_size // t, vocab_size=v1 - v0)
    return ShardInfo(rank=rank, world=t, cfg=cfg, local_cfg=local_cfg, num_heads=cfg.num_heads // t,
                     num_kv_heads=local_kv, kv_head_start=kv_start, kv_replicas=replicas,
                     intermediate_size=cfg.intermediate_size // t, vocab_start=v0, vocab_end=v1,
                     vocab_sizes=tuple(b - a for a, b in ranges))


# ----------------------------------------------------------------------------------------------- base weights

ROW_BIAS = "row_bias"  # a row-parallel layer's bias: rank 0 keeps it, the others hold zeros


def param_split(name: str, shard: ShardInfo) -> tuple[int, int, int] | str | None:
    """How the model parameter `name` (HF naming) is cut for this rank: (dim, start, end) of the full tensor,
    ROW_BIAS, or None (replicated: norms)."""
    if name in VOCAB_PARAMS:
        return 0, shard.vocab_start, shard.vocab_end
    parts = name.rsplit(".", 2)
    if len(parts) < 3:
        return None
    module, kind = parts[-2], parts[-1]
    if module in COLUMN_MODULES:
        return (0, *shard.out_range(module))
    if module in ROW_MODULES:
        return (1, *shard.in_range(module)) if kind == "weight" else ROW_BIAS
    return None


# ----------------------------------------------------------------------------------------------- LoRA


@dataclass(frozen=True)
class LoraPiece:
    """This rank's piece of one LoRA tensor: rows/columns [start, end) along `dim` of the full tensor (dim None:
    the whole tensor), held identically by `replicas` ranks, of which this rank is the first (`owner`) or not."""

    dim: int | None
    start: int
    end: int
    replicas: int
    owner: bool

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the full tensor (a view)."""
        if self.dim is None:
            return full
        return full.narrow(self.dim, self.start, self.end - self.start)


def lora_piece(key: str, which: str, shard: ShardInfo, full_shape: tuple[int, ...]) -> LoraPiece:
    """`which` is "a" (lora_A [r, in]) or "b" (lora_B [out, r]) of the adapter on module `key`."""
    module = key.rsplit(".", 1)[-1]
    t, rank = shard.world, shard.rank
    whole = LoraPiece(None, 0, full_shape[0], replicas=t, owner=rank == 0)
    if module in COLUMN_MODULES:
        if which == "a":
            return whole
        start, end = shard.out_range(module)
        replicas = shard.kv_replicas if module in ("k_proj", "v_proj") else 1
        return LoraPiece(0, start, end, replicas=replicas, owner=rank % replicas == 0)
    if module in ROW_MODULES:
        if which == "b":
            return whole
        start, end = shard.in_range(module)
        return LoraPiece(1, start, end, replicas=1, owner=True)
    raise KeyError(f"not a LoRA target: {key}")


def _full_shapes(key: str, cfg: ModelConfig, rank: int) -> dict[str, tuple[int, int]]:
    from tinkerbell.engine.lora import module_shape

    fan_in, fan_out = module_shape(cfg, key)
    return {"a": (rank, fan_in), "b": (fan_out, rank)}


def split_lora_name(name: str) -> tuple[str, str]:
    """"<key>.lora_A" -> (key, "a") (the optimizer's parameter names)."""
    key, which = name.rsplit(".", 1)
    if which not in ("lora_A", "lora_B"):
        raise KeyError(f"not a LoRA parameter name: {name}")
    return key, "a" if which == "lora_A" else "b"


def lora_name_piece(name: str, shard: ShardInfo, lora_rank: int) -> tuple[LoraPiece, tuple[int, int]]:
    """The piece and full shape of the LoRA parameter named "<key>.lora_A" / "<key>.lora_B"."""
    key, which = split_lora_name(name)
    full = _full_shapes(key, shard.cfg, lora_rank)[which]
    return lora_piece(key, which, shard, full), full


def shard_lora_tensor(name: str, full: torch.Tensor, shard: ShardInfo) -> torch.Tensor:
    """This rank's piece of a whole LoRA tensor (a weight or an optimizer moment), as its own storage so the
    whole tensor can be freed."""
    lora_rank = full.shape[0] if name.endswith("lora_A") else full.shape[1]
    piece, shape = lora_name_piece(name, shard, lora_rank)
    if tuple(full.shape) != shape:
        raise ValueError(f"{name} has shape {list(full.shape)}, expected {list(shape)} for this model")
    return piece.take(full).contiguous().clone()


def shard_adapter(full: "AdapterWeights", shard: ShardInfo) -> "AdapterWeights":
    """This rank's adapter, cut from the whole one (its tensors own their storage)."""
    from tinkerbell.engine.lora import AdapterWeights

    out = AdapterWeights(spec=full.spec)
    for key in full.a:
        out.a[key] = shard_lora_tensor(f"{key}.lora_A", full.a[key], shard)
        out.b[key] = shard_lora_tensor(f"{key}.lora_B", full.b[key], shard)
    return out


def gather_lora_tensors(items: list[tuple[str, torch.Tensor]], tp: "TPGroup",
                        shard: ShardInfo) -> list[torch.Tensor] | None:
    """The whole tensors of every rank's pieces (`items`: (LoRA parameter name, local tensor), the same names in
    the same order on every rank): on rank 0, None elsewhere. Collective: every rank calls it.

    One flat reduce: each piece's owner writes it at its place in a zero buffer of the whole tensors' shapes and
    the buffers are summed onto rank 0 (adding zeros is exact, so the result is bit-for-bit the pieces)."""
    layout = []
    total = 0
    for name, t in items:
        lora_rank = t.shape[0] if name.endswith("lora_A") else t.shape[1]
        piece, full = lora_name_piece(name, shard, lora_rank)
        layout.append((piece, full, total))
        total += full[0] * full[1]
    first = items[0][1] if items else torch.zeros(0)
    buf = torch.zeros(total, dtype=first.dtype, device=first.device)
    for (name, t), (piece, full, at) in zip(items, layout):
        if piece.owner:
            piece.take(buf[at:at + full[0] * full[1]].view(full)).copy_(t.detach())
    dist.reduce(buf, dst=0, group=tp.group)
    if tp.rank != 0:
        return None
    return [buf[at:at + full[0] * full[1]].view(full).clone() for _, full, at in layout]


def gather_adapter(local: "AdapterWeights", tp: "TPGroup", shard: ShardInfo) -> "AdapterWeights | None":
    """The whole adapter on rank 0 (None on the other ranks). Collective: every rank calls it."""
    from tinkerbell.engine.lora import AdapterWeights

    keys = list(local.a)
    items = [(f"{k}.lora_{w}", (local.a if w == "A" else local.b)[k]) for k in keys for w in ("A", "B")]
    whole = gather_lora_tensors(items, tp, shard)
    if whole is None:
        return None
    return AdapterWeights(spec=local.spec, a={k: whole[2 * i] for i, k in enumerate(keys)},
                          b={k: whole[2 * i + 1] for i, k in enumerate(keys)})


def sync_replicated_grads(params: list[tuple[str, torch.Tensor]], tp: "TPGroup", shard: ShardInfo) -> None:
    """Sum the partial gradients of replicated LoRA tensors over the ranks that hold them, in place, in one
    all-reduce (`params`: (name, leaf with .grad), same names and order on every rank; split tensors' gradients
    are already whole and are left alone). A kv-head-replicated B sits at its heads' rows in a buffer of the
    whole B, so only the ranks sharing those heads add into it."""
    layout = []
    total = 0
    for name, p in params:
        if p.grad is None:
            continue
        lora_rank = p.shape[0] if name.endswith("lora_A") else p.shape[1]
        piece, full = lora_name_piece(name, shard, lora_rank)
        if piece.replicas == 1:
            continue
        layout.append((p, piece, full, total))
        total += full[0] * full[1]
    if not layout:
        return
    first = layout[0][0].grad
    buf = torch.zeros(total, dtype=first.dtype, device=first.device)
    for p, piece, full, at in layout:
        piece.take(buf[at:at + full[0] * full[1]].view(full)).copy_(p.grad)
    dist.all_reduce(buf, group=tp.group)
    for p, piece, full, at in layout:
        p.grad.copy_(piece.take(buf[at:at + full[0] * full[1]].view(full)))


def norm_owner(name: str, shard: ShardInfo, lora_rank: int) -> bool:
    """Whether this rank counts the LoRA parameter `name` in a norm over the whole adapter (each value once)."""
    return lora_name_piece(name, shard, lora_rank)[0].owner
