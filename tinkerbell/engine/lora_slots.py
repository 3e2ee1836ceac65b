"""Resident LoRA adapters for sampling: `max_loras` slots in stacked, rank-padded tensors.

For every target module the slots live in one tensor, A: [max_loras, max_lora_rank, in] and
B: [max_loras, out, max_lora_rank], in the model dtype, so a gathered (SGMV-style) kernel can index them by slot.
Ranks below the maximum are zero-padded, which is exact: padded rows of A meet zero columns of B. The
`AdapterWeights` handed to the model are views into these tensors.

Registered adapters are kept as sources (a device copy of in-memory weights, or a checkpoint path) and loaded
into a slot on first use; slots held by no running request are evicted least recently used. A request holds
("pins") its slot from admission until it finishes, so its weights never change under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tinkerbell.engine.adapter_io import CONFIG_FILE, WEIGHTS_FILE, load_peft, read_spec
from tinkerbell.engine.lora import AdapterWeights, LoraSpec, module_shape
from tinkerbell.engine.models.config import ModelConfig
from tinkerbell.engine.tp.shard import ShardInfo, shard_adapter
from tinkerbell.engine.types import EngineUserError

_PEFT_PREFIX = "base_model.model."


@dataclass
class _Source:
    spec: LoraSpec
    weights: AdapterWeights | None  # in-memory (already on the device, in the slot dtype)
    path: Path | None
    version: int


@dataclass
class _Slot:
    key: str | None = None  # None: empty
    version: int = 0
    pins: int = 0
    last_used: int = 0
    stale: bool = False  # its key was re-registered or removed while pinned: free it when released
    view: AdapterWeights | None = None


@dataclass
class _LoadPlan:
    targeted: list[str]
    a: dict[str, torch.Tensor]  # the slot's views, rank-sliced
    b: dict[str, torch.Tensor]
    dst: list[torch.Tensor]  # every A view, then every B view (the copy's destinations)
    stale: list[torch.Tensor]  # what a load zeroes: rows past the rank, modules not targeted
    flags: torch.Tensor  # int32 [modules] on the device: which modules the adapter targets


class LoraSlots:
    def __init__(self, cfg: ModelConfig, max_loras: int, max_lora_rank: int, dtype: torch.dtype,
                 device: torch.device | str, shard: ShardInfo | None = None):
        """`cfg` is the full model's; with a tensor-parallel `shard` the slots hold this rank's pieces
        (engine/tp/shard.py): in-memory adapters arrive already cut (the local trainer's snapshots), checkpoints
        are read whole and cut on load."""
        self.cfg, self.max_loras, self.max_rank = cfg, max_loras, max_lora_rank
        self.shard = shard
        self.local_cfg = shard.local_cfg if shard is not None else cfg  # the slot shapes
        self.dtype, self.device = dtype, torch.device(device)
        all_targets = LoraSpec(rank=1).target_keys(cfg)
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        if max_loras > 0:
            for key in all_targets:
                fan_in, fan_out = module_shape(self.local_cfg, key)
                self.a[key] = torch.zeros(max_loras, max_lora_rank, fan_in, dtype=dtype, device=self.device)
                self.b[key] = torch.zeros(max_loras, fan_out, max_lora_rank, dtype=dtype, device=self.device)
        # Whether each slot's adapter targets each module (int32, 0/1): the gathered kernels skip the rest, so a
        # batch whose adapters leave lm_head alone never reads the lm_head slots.
        # One [modules, slots] tensor, so a load sets a slot's flags for every module in one host→device copy.
        self._present = torch.zeros(len(self.a), max(max_loras, 1), dtype=torch.int32, device=self.device)
        self.present: dict[str, torch.Tensor] = {key: self._present[i] for i, key in enumerate(self.a)}
        # alpha / rank of each slot's adapter, for the gathered kernels (which see all slots at once).
        self.scales = torch.zeros(max(max_loras, 1), dtype=torch.float32, device=self.device)
        self.slots = [_Slot() for _ in range(max_loras)]
        self._sources: dict[str, _Source] = {}
        self._resident: dict[str, int] = {}  # key -> slot holding its current version
        self._clock = 0
        self._versions = 0
        self.loads = 0
        # Per (slot, rank, targeted modules): the slot's views and what a load must zero. Built once, since
        # creating ~450 views per load was most of the trainer→sampler handoff's host time.
        self._plans: dict[tuple[int, int, tuple[str, ...]], _LoadPlan] = {}
        # Tensor parallel: rank 0 records every (slot, key) load its scheduler makes, so its workers, which
        # never schedule, repeat them before the next op (engine/tp/executor.py). None: not recording.
        self.load_log: list[tuple[int, str]] | None = None

    # ------------------------------------------------------------------------------------------- registry

    def register(self, key: str, source: AdapterWeights | Path, copy: bool = True) -> None:
        """Make `key` available (replacing what it named before); validates rank and shapes now, loads later.
        In-memory weights are copied unless `copy=False` (the caller hands over a fresh snapshot it will never
        touch again: the trainer's handoff, which would otherwise pay for a second copy)."""
        if self.max_loras == 0:
            raise EngineUserError("adapter_key: LoRA sampling is disabled on this server (--max-loras 0)")
        if isinstance(source, AdapterWeights):
            spec = source.spec
            self._check_rank(key, spec)
            for k in source.a:
                self._check_shapes(key, k, tuple(source.a[k].shape), tuple(source.b[k].shape), spec.rank,
                                   self.local_cfg)
            owned = not copy and all(t.dtype == self.dtype and t.device == self.device for t in source.parameters())
            weights = source if owned else source.detached_copy(dtype=self.dtype, device=self.device)
            path = None
        else:
            path = Path(source)
            spec = self._check_checkpoint(key, path)
            weights = None
        self._versions += 1
        self._drop_resident(key)
        self._sources[key] = _Source(spec=spec, weights=weights, path=path, version=self._versions)

    def unregister(self, key: str) -> bool:
        if key not in self._sources:
            return False
        del self._sources[key]
        self._drop_resident(key)
        return True

    def has(self, key: str) -> bool:
        return key in self._sources

    def cache_salt(self, slot: int) -> str:
        """Prefix-cache salt of the weights in `slot`: distinguishes K/V computed under different adapters, and
        under different versions of one key (a slot keeps the version it loaded even after re-registration)."""
        s = self.slots[slot]
        return f"lora:{s.key}:{s.version}"

    # ------------------------------------------------------------------------------------------- slots

    def acquire(self, key: str) -> int | None:
        """Pin a slot holding `key`'s current weights, loading them if needed; None when every slot is pinned."""
        src = self._sources.get(key)
        if src is None:
            raise EngineUserError(f"adapter_key: unknown adapter {key!r} (was it unregistered?)")
        self._clock += 1
        slot = self._resident.get(key)
        if slot is None:
            slot = self._victim()
            if slot is None:
                return None
            self._load(slot, key, src)
        s = self.slots[slot]
        s.pins += 1
        s.last_used = self._clock
        return slot

    def release(self, slot: int) -> None:
        s = self.slots[slot]
        assert s.pins > 0, f"release of unpinned LoRA slot {slot}"
        s.pins -= 1
        if s.pins == 0 and s.stale:
            self._clear(slot)

    def weights(self, slot: int) -> AdapterWeights:
        view = self.slots[slot].view
        assert view is not None, f"LoRA slot {slot} is empty"
        return view

    def resident(self) -> list[str]:
        return [s.key for s in self.slots if s.key is not None and not s.stale]

    def release_all(self) -> None:
        for i, s in enumerate(self.slots):
            s.pins = 0
            if s.stale:
                self._clear(i)

    # ------------------------------------------------------------------------------------------- internals

    def _victim(self) -> int | None:
        empty = [i for i, s in enumerate(self.slots) if s.key is None]
        if empty:
            return empty[0]
        idle = [i for i, s in enumerate(self.slots) if s.pins == 0]
        if not idle:
            return None
        slot = min(idle, key=lambda i: self.slots[i].last_used)
        old = self.slots[slot].key
        if old is not None and self._resident.get(old) == slot:
            del self._resident[old]
        return slot

    def _load(self, slot: int, key: str, src: _Source) -> None:
        weights = src.weights
        if weights is None:
            assert src.path is not None
            try:
                weights = load_peft(src.path, self.cfg, dtype=self.dtype, device=self.device)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint fails only its own requests
                raise EngineUserError(f"adapter_key: could not load adapter {key!r} from {src.path}: {e}") from e
            if self.shard is not None:
                weights = shard_adapter(weights, self.shard)
        plan = self._plan(slot, src.spec.rank, tuple(k for k in self.a if k in weights.a))
        # A few multi-tensor launches instead of several per module (~450 for 1B at r32): zero what a previous
        # tenant may have left (a larger rank, more targets), then copy every module's A and B at once.
        with torch.no_grad():
            if plan.stale:
                torch._foreach_zero_(plan.stale)
            if plan.targeted:
                torch._foreach_copy_(plan.dst, [weights.a[k] for k in plan.targeted] +
                                     [weights.b[k] for k in plan.targeted])
            self._present[:, slot].copy_(plan.flags, non_blocking=True)
            self.scales[slot] = src.spec.scale
        view = AdapterWeights(spec=src.spec, a=dict(plan.a), b=dict(plan.b))
        self.slots[slot] = _Slot(key=key, version=src.version, view=view)
        self._resident[key] = slot
        self.loads += 1
        if self.load_log is not None:
            self.load_log.append((slot, key))

    def _plan(self, slot: int, rank: int, targeted: tuple[str, ...]) -> "_LoadPlan":
        plan = self._plans.get((slot, rank, targeted))
        if plan is None:
            a = {k: self.a[k][slot, :rank] for k in targeted}
            b = {k: self.b[k][slot, :, :rank] for k in targeted}
            stale = [self.a[k][slot, rank:] for k in targeted] + [self.b[k][slot, :, rank:] for k in targeted]
            stale += [t[slot] for k in self.a if k not in targeted for t in (self.a[k], self.b[k])]
            flags = torch.tensor([int(k in targeted) for k in self.a], dtype=torch.int32).to(self.device)
            plan = _LoadPlan(targeted=list(targeted), a=a, b=b, dst=list(a.values()) + list(b.values()),
                             stale=[t for t in stale if t.numel()], flags=flags)
            self._plans[(slot, rank, targeted)] = plan
        return plan

    def load_as(self, slot: int, key: str) -> None:
        """A tensor-parallel worker repeats a load rank 0's scheduler made. Workers never pin or release, so
        the slot stays pinned until rank 0 reuses it: unregistering `key` must not drop weights rank 0 may
        still be running."""
        old = self.slots[slot].key
        if old is not None and self._resident.get(old) == slot:
            del self._resident[old]
        self._load(slot, key, self._sources[key])
        self.slots[slot].pins = 1

    def _drop_resident(self, key: str) -> None:
        slot = self._resident.pop(key, None)
        if slot is None:
            return
        if self.slots[slot].pins > 0:
            self.slots[slot].stale = True  # requests already running keep the weights they started with
        else:
            self._clear(slot)

    def _clear(self, slot: int) -> None:
        self.slots[slot] = _Slot()

    def _check_rank(self, key: str, spec: LoraSpec) -> None:
        if spec.rank > self.max_rank:
            raise EngineUserError(
                f"adapter {key!r} has LoRA rank {spec.rank}, above this server's limit of {self.max_rank} "
                f"(--max-lora-rank)")
        if spec.rank < 1:
            raise EngineUserError(f"adapter {key!r} has LoRA rank {spec.rank}; it must be at least 1")

    def _check_shapes(self, key: str, target: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...],
                      rank: int, cfg: ModelConfig) -> None:
        """Against `cfg`: the full model's for a checkpoint, the local shard's for in-memory weights."""
        try:
            fan_in, fan_out = module_shape(cfg, target)
        except KeyError:
            raise EngineUserError(f"adapter {key!r} targets {target}, which this model has no LoRA slot for")
        if target not in self.a:
            raise EngineUserError(f"adapter {key!r} targets {target}, which this model does not have")
        if a_shape != (rank, fan_in) or b_shape != (fan_out, rank):
            raise EngineUserError(
                f"adapter {key!r} does not fit this model: {target} has A {list(a_shape)} and B {list(b_shape)}, "
                f"expected [{rank}, {fan_in}] and [{fan_out}, {rank}]")

    def _check_checkpoint(self, key: str, path: Path) -> LoraSpec:
        """Read only the config and the safetensors header, so a bad checkpoint fails at registration."""
        if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
            raise EngineUserError(f"adapter {key!r}: {path} has no {CONFIG_FILE} / {WEIGHTS_FILE}")
        try:
            spec = read_spec(path)
        except (ValueError, KeyError) as e:
            raise EngineUserError(f"adapter {key!r}: unreadable {CONFIG_FILE} in {path}: {e}") from e
        self._check_rank(key, spec)
        with safe_open(str(path / WEIGHTS_FILE), framework="pt", device="cpu") as st:
            names = set(st.keys())
            for target in spec.target_keys(self.cfg):
                an, bn = f"{_PEFT_PREFIX}{target}.lora_A.weight", f"{_PEFT_PREFIX}{target}.lora_B.weight"
                if an not in names or bn not in names:
                    raise EngineUserError(f"adapter {key!r} in {path} lacks LoRA weights for {target}")
                self._check_shapes(key, target, tuple(st.get_slice(an).get_shape()),
                                   tuple(st.get_slice(bn).get_shape()), spec.rank, self.cfg)
        return spec
