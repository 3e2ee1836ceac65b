"""The fused per-layer kernels (kernels/fused_layer.py) compute what the reference modules compute: residual add
+ RMSNorm, RoPE + cache write, SiLU·mul. On the CPU this checks the torch forms (the GPU fallback and the
kernels' reference); the Triton kernels are checked against them on the GPU in bench/sampling_speed.py, and
here too under Triton's interpreter where Triton is installed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.engine.test_kernels import backend  # noqa: F401 - the torch / triton-interpret fixture
from tinkerbell.engine.kernels import fused_layer as fl
from tinkerbell.engine.models import llama


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rmsnorm_equals_module(backend, dtype):  # noqa: F811
    g = torch.Generator().manual_seed(0)
    norm = llama.RMSNorm(48, 1e-5)
    norm.weight.data = (torch.rand(48, generator=g) + 0.5)
    norm = norm.to(dtype)
    x, res = torch.randn(5, 48, generator=g).to(dtype), torch.randn(5, 48, generator=g).to(dtype)
    want_sum = res + x
    with torch.no_grad():
        want = norm(want_sum)
        out, new_res = fl.add_rmsnorm(x, res.clone(), norm.weight, norm.eps)
        first, same = fl.add_rmsnorm(x, None, norm.weight, norm.eps)
    assert torch.equal(new_res, want_sum) and torch.allclose(out, want, atol=1e-6, rtol=1e-2 if dtype != torch.float32 else 1e-6)
    assert same is x and torch.allclose(first, norm(x), atol=1e-6, rtol=1e-2 if dtype != torch.float32 else 1e-6)


def test_rope_cache_write_equals_reference(backend):  # noqa: F811
    g = torch.Generator().manual_seed(1)
    t, h, kvh, d = 6, 8, 2, 16
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=g)
    q, k, v = (p.view(t, -1, d) for p in qkv.split([h * d, kvh * d, kvh * d], dim=-1))  # strided views
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.tensor([3, 4, 5, 9, 0, 17]).float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    kc, vc = torch.zeros(40, kvh, d), torch.zeros(40, kvh, d)
    slots = torch.tensor([7, 3, 30, 31, 0, 12])
    got = fl.rope_cache_write(q, k, v, cos, sin, kc, vc, slots)
    c, s = cos[:, None], sin[:, None]
    assert torch.allclose(got, q * c + llama.rotate_half(q) * s, atol=1e-6)
    assert torch.allclose(kc[slots], k * c + llama.rotate_half(k) * s, atol=1e-6)
    assert torch.equal(vc[slots], v)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slots] = False
    assert kc[untouched].abs().sum() == 0 and vc[untouched].abs().sum() == 0


def test_silu_mul_equals_reference(backend):  # noqa: F811
    gu = torch.randn(3, 2 * 40, generator=torch.Generator().manual_seed(2))
    g, u = gu.chunk(2, dim=-1)
    assert torch.allclose(fl.silu_mul(gu), F.silu(g) * u, atol=1e-6)
