"""GPU kernels (Triton) with plain-torch equivalents.

Triton is imported only when a kernel is first asked for on a CUDA tensor (or under TRITON_INTERPRET=1, which
runs kernels on the CPU for tests), so a machine without Triton never imports it and uses the torch paths.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel should run through Triton for a tensor on this device."""
    if t.device.type == "cuda":
        return triton_importable()
    return interpret_mode() and triton_importable()
