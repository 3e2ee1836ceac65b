"""The tensor-parallel process group and the collectives the sharded model calls.

Two groups: `group` carries tensors (NCCL on GPU, gloo on CPU: the same code either way) and `cpu_group`
(always gloo) carries the few objects broadcast at startup. Per-step plans do not travel here: rank 0 writes
them to one pipe per worker (engine/tp/launch.py), which costs microseconds where a gloo object broadcast cost
hundreds, and tells a worker at once (EOF) that rank 0 is gone.

Every helper here takes `tp: TPGroup | None`; None is the plain single-process path and costs nothing. A
`TPGroup` of world 1 (the distributed path at --tp 1) skips its collectives, which are identities over one rank:
each would be a kernel launch per layer (measured +2.0% per decode step at batch 1 on an H100) for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Workers wait in a broadcast for rank 0's next plan for as long as the server is idle: no collective timeout.
# A dead peer is caught by the process monitor (engine/tp/launch), not by a timeout.
WAIT_FOREVER = timedelta(days=3650)


@dataclass
class TPGroup:
    rank: int
    world: int
    group: Any  # torch.distributed.ProcessGroup for tensors
    cpu_group: Any  # torch.distributed.ProcessGroup (gloo) for plans

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (pickled over gloo)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def all_reduce_(self, x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce, outside autograd (gradient sync, maxima, counts)."""
        if self.world > 1:
            dist.all_reduce(x, op=op, group=self.group)
        return x


def init_tp(rank: int, world: int, init_method: str, device: torch.device) -> TPGroup:
    """Join the replica's group (`init_method`: e.g. tcp://127.0.0.1:PORT, chosen by rank 0)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device  # binds the communicator to this rank's GPU up front
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=WAIT_FOREVER,
                            **kwargs)
    group = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=WAIT_FOREVER) if backend == "nccl" else group
    return TPGroup(rank=rank, world=world, group=group, cpu_group=cpu_group)


# ----------------------------------------------------------------------------------------- autograd collectives
# Megatron's pair: `copy_to_tp` (identity forward, all-reduce of the gradient) where a replicated activation
# enters column-parallel layers, and `reduce_from_tp` (all-reduce forward, identity backward) where row-parallel
# partial sums leave them. Between the two, every rank's gradients of replicated tensors stay whole.


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TPGroup) -> torch.Tensor:  # type: ignore[override]
        out = x.contiguous().clone() if torch.is_grad_enabled() else x.contiguous()
        dist.all_reduce(out, group=tp.group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TPGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.tp.group)
        return grad, None


def reduce_from_tp(x: torch.Tensor, tp: TPGroup | None) -> torch.Tensor:
    """Sum of every rank's partial `x` (row-parallel outputs, vocab-parallel lookups)."""
    if tp is None or tp.world == 1:
        return x
    if not torch.is_grad_enabled() or not x.requires_grad:
        x = x.contiguous()
        dist.all_reduce(x, group=tp.group)
        return x
    return _ReduceFromTP.apply(x, tp)


def copy_to_tp(x: torch.Tensor, tp: TPGroup | None) -> torch.Tensor:
    """`x` unchanged; its gradient summed over ranks in backward (inputs of column-parallel layers)."""
    if tp is None or tp.world == 1 or not torch.is_grad_enabled() or not x.requires_grad:
        return x
    return _CopyToTP.apply(x, tp)


def gather_last_dim(x: torch.Tensor, tp: TPGroup | None, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's shard of the last dimension (shard r has `sizes[r]` columns; shards may be
    uneven, e.g. a vocabulary not divisible by T). Outside autograd: the sampler's logits."""
    if tp is None or tp.world == 1:
        return x
    width = max(sizes)
    if x.shape[-1] < width:  # all_gather needs equal shapes: pad, then trim
        x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    parts = [torch.empty_like(x) for _ in range(tp.world)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)
