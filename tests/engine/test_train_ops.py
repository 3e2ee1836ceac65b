"""The training layer's fused elementwise ops (kernels/train_ops.py): outputs and gradients equal the model's own
modules under autograd (float32). On the CPU this checks the torch forms; under Triton's interpreter (where
Triton is installed) the Triton kernels and their hand-written backwards; bench/train_ops_check.py checks the
kernels on a GPU in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.engine.test_kernels import backend  # noqa: F401 - the torch / triton-interpret fixture
from tinkerbell.engine.kernels import train_ops
from tinkerbell.engine.models import llama


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad(out, inputs, upstream))


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_and_its_gradient_equal_the_module(backend, with_residual):  # noqa: F811
    g = torch.Generator().manual_seed(0)
    norm = llama.RMSNorm(48, 1e-5)
    norm.weight.data = torch.rand(48, generator=g) + 0.5
    norm.weight.requires_grad_(False)  # frozen base weights, as in training
    x = torch.randn(6, 48, generator=g, requires_grad=True)
    res = torch.randn(6, 48, generator=g, requires_grad=True)
    want_s = res + x if with_residual else x
    want_y = norm(want_s)
    # Both outputs carry gradient when there is a residual (the sum goes on down the residual stream).
    want = (want_y * torch.randn(6, 48, generator=torch.Generator().manual_seed(3))).sum()
    if with_residual:
        want = want + (want_s * torch.randn(6, 48, generator=torch.Generator().manual_seed(4))).sum()
    inputs = [x, res] if with_residual else [x]
    want_grads = torch.autograd.grad(want, inputs)

    y, s = train_ops.rms_norm(x, norm.weight, norm.eps, residual=res if with_residual else None)
    got = (y * torch.randn(6, 48, generator=torch.Generator().manual_seed(3))).sum()
    if with_residual:
        got = got + (s * torch.randn(6, 48, generator=torch.Generator().manual_seed(4))).sum()
    else:
        assert s is x
    got_grads = torch.autograd.grad(got, inputs)
    assert torch.allclose(y, want_y, atol=1e-6) and torch.allclose(s, want_s)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def _rope_inputs(t: int, h: int, kvh: int, d: int):
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=g, requires_grad=True)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(t).float()[:, None] * inv[None, :] * 3
    emb = torch.cat([freqs, freqs], dim=-1)
    return qkv, emb.cos(), emb.sin()


def test_rope_of_fused_qkv_and_its_gradient_equal_the_attention_module(backend):  # noqa: F811
    t, h, kvh, d = 7, 4, 2, 16
    qkv, cos, sin = _rope_inputs(t, h, kvh, d)
    q, k, v = (p.reshape(t, -1, d) for p in qkv.split([h * d, kvh * d, kvh * d], dim=-1))
    c, s = cos[:, None], sin[:, None]
    want = (q * c + llama.rotate_half(q) * s, k * c + llama.rotate_half(k) * s, v)
    got = train_ops.rope_qkv(qkv, cos, sin, h, kvh, d)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    flat = lambda outs: torch.cat([o.reshape(t, -1) for o in outs], dim=-1)  # noqa: E731
    (want_grad,) = _grads(flat(want), [qkv], seed=5)
    (got_grad,) = _grads(flat(got), [qkv], seed=5)
    assert torch.allclose(got_grad, want_grad, atol=1e-5)


def test_silu_mul_and_its_gradient_equal_the_reference(backend):  # noqa: F811
    gu = torch.randn(5, 2 * 40, generator=torch.Generator().manual_seed(2), requires_grad=True)
    g, u = gu.chunk(2, dim=-1)
    want = F.silu(g) * u
    got = train_ops.silu_mul(gu)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(_grads(got, [gu], 6)[0], _grads(want, [gu], 6)[0], atol=1e-5)


def test_target_logprobs_and_their_gradient_equal_log_softmax(backend):  # noqa: F811
    """Rows with several targets, a row with none, a vocabulary that is not a multiple of the kernel's block."""
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(4, 5000, generator=g) * 4).requires_grad_(True)
    rows = torch.tensor([0, 0, 1, 3, 3, 3])
    ids = torch.tensor([7, 4999, 0, 12, 12, 4096])
    want = logits.log_softmax(-1)[rows, ids]
    got = train_ops.target_logprobs(logits, rows, ids)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(_grads(got, [logits], 9)[0], _grads(want, [logits], 9)[0], atol=1e-6)
