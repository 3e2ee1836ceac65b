"""GPU kernels (Triton) with plain-torch equivalents.

Triton is imported only when a kernel is first asked for on a CUDA tensor, so a machine without Triton never
imports it and uses the torch paths. Tests may run the kernels on the CPU through Triton's interpreter: they set
TRITON_INTERPRET=1 before anything imports Triton (its decorators read it) and turn on RUN_KERNELS_ON_CPU.
"""

from __future__ import annotations

import functools
import os

import torch

RUN_KERNELS_ON_CPU = False
# Programmatic dependent launch of the decode path's kernels (see _pdl_triton.py): TINKERBELL_PDL=1 turns it on.
# Off by default until it has been measured and checked on a GPU (bench/device_issue4.sh PDL_AB=1 does both).
PDL = os.environ.get("TINKERBELL_PDL", "0") == "1"
# The training layer's fused kernels (kernels/train_ops.py); TINKERBELL_TRAIN_KERNELS=0 falls back to the plain
# torch forms on a GPU too (an escape hatch, and the A/B baseline for bench/train_ops_check.py).
TRAIN_KERNELS = os.environ.get("TINKERBELL_TRAIN_KERNELS", "1") != "0"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel should run through Triton for a tensor on this device."""
    if t.device.type == "cuda":
        return triton_importable()
    return RUN_KERNELS_ON_CPU and triton_importable()


@functools.lru_cache(maxsize=None)
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Whether Triton kernels on this tensor's device launch with PDL: on a GPU of compute capability 9.0 or
    later (never under the CPU interpreter), unless PDL is off."""
    if not PDL or t.device.type != "cuda":
        return False
    return _hopper_or_later(t.device.index if t.device.index is not None else torch.cuda.current_device())
