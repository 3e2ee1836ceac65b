"""Fused per-layer elementwise work of the fast path: residual add + RMSNorm, RoPE + KV-cache write, SiLU·mul.

Inside a decode step these small ops, not the matmuls, were most of the launches: RMSNorm alone is five kernels
in float32 (twice a layer), RoPE another eight, the cache write two. Each function here is one Triton launch on
the GPU and, on the CPU (or without Triton), the plain-torch form below it, which computes exactly what the
reference modules in models/llama.py compute (same ops, same rounding), and is the kernels' reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinkerbell.engine.kernels import use_triton


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x) · weight, residual + x). `residual` is updated in place (it is the layer stack's
    own running sum); None means x is the first residual (the embedding)."""
    if use_triton(x) and x.stride(-1) == 1:
        from tinkerbell.engine.kernels._fused_layer_triton import add_rmsnorm as launch

        return launch(x, residual, weight, eps)
    return add_rmsnorm_torch(x, residual, weight, eps)


def add_rmsnorm_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is None:
        residual = x
    else:
        residual += x
    h = residual.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(residual.dtype), residual


def rope_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotate q [T, H, D] and k [T, KVH, D] by RoPE (cos/sin [T, D], halves repeated), write the rotated k and
    v into the caches at `slot_mapping`; returns the rotated q (contiguous). q/k/v may be strided views."""
    d = q.shape[-1]
    if use_triton(q) and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and d % 2 == 0:
        from tinkerbell.engine.kernels._fused_layer_triton import rope_cache_write as launch

        return launch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return rope_cache_write_torch(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cache_write_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> torch.Tensor:
    c, s = cos[:, None, :], sin[:, None, :]
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(g) · u for gate_up = [g | u] along the last dim."""
    if use_triton(gate_up) and gate_up.stride(-1) == 1:
        from tinkerbell.engine.kernels._fused_layer_triton import silu_mul as launch

        return launch(gate_up)
    return silu_mul_torch(gate_up)


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g) * u
