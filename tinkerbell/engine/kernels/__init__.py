"""GPU kernels (Triton) with plain-torch equivalents.

Triton is imported only when a kernel is first asked for on a CUDA tensor, so a machine without Triton never
imports it and uses the torch paths. Tests may run the kernels on the CPU through Triton's interpreter: they set
TRITON_INTERPRET=1 before anything imports Triton (its decorators read it) and turn on RUN_KERNELS_ON_CPU.
"""

from __future__ import annotations

import functools

import torch

RUN_KERNELS_ON_CPU = False


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
