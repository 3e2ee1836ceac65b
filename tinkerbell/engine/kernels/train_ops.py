"""The training layer's elementwise work with hand-written backwards: RMSNorm (with the residual add), RoPE
of the fused q/k/v projection, SiLU·mul, and the log-probabilities of target tokens from a chunk of logits.

In eager torch these are chains of float32 elementwise kernels, each reading and writing full [tokens, width]
tensors, and autograd keeps their intermediates and replays the chain backwards: on the 1B model at 8k tokens
the second session's H100 profile had most of a step's non-GEMM GPU time here. Each function below is one Triton
launch forward and one backward on the GPU, saving only what the backward reads (the norm's input and a
float32 1/rms per row, the SiLU's input). On the CPU, or without Triton, each is the plain-torch form below
it, the same ops as the model's modules (models/llama.py), which is also the kernels' reference in tests.
"""

from __future__ import annotations

import torch

from tinkerbell.engine import kernels
from tinkerbell.engine.kernels import use_triton
# the decode path's torch forms, which are these ops' too
from tinkerbell.engine.kernels.fused_layer import rotate_half, silu_mul_torch


def _fused(t: torch.Tensor) -> bool:
    return kernels.TRAIN_KERNELS and use_triton(t)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(s) · weight, s) with s = x + residual (x itself without one)."""
    if _fused(x) and x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1):
        if residual is None:
            return _RMSNorm.apply(x, None, weight, eps), x
        return _RMSNorm.apply(x, residual, weight, eps)
    return rms_norm_torch(x, weight, eps, residual)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    s = x if residual is None else residual + x
    h = s.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(s.dtype), s


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        from tinkerbell.engine.kernels._train_ops_triton import rmsnorm_fwd

        y, s, rstd = rmsnorm_fwd(x, residual, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.set_materialize_grads(False)
        ctx.has_residual = residual is not None
        return (y, s) if ctx.has_residual else y

    @staticmethod
    def backward(ctx, dy, ds=None):
        from tinkerbell.engine.kernels._train_ops_triton import rmsnorm_bwd

        s, weight, rstd = ctx.saved_tensors
        dx = ds if dy is None else rmsnorm_bwd(dy, s, weight, rstd, ds)
        return dx, (dx if ctx.has_residual else None), None, None


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, heads, D] and k [T, kv_heads, D] rotated by RoPE (cos/sin [T, D], halves repeated) and v
    [T, kv_heads, D], from the fused projection's output [T, (heads + 2·kv_heads)·D]."""
    if _fused(qkv) and qkv.stride(-1) == 1 and head_dim & (head_dim - 1) == 0:
        return _RopeQKV.apply(qkv, cos, sin, heads, kv_heads, head_dim)
    return rope_qkv_torch(qkv, cos, sin, heads, kv_heads, head_dim)


def _split_qkv(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    t = qkv.shape[0]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim)


def rope_qkv_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _split_qkv(qkv, heads, kv_heads, head_dim)
    c, s = cos[:, None, :], sin[:, None, :]
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s, v


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, heads, kv_heads, head_dim):
        from tinkerbell.engine.kernels._train_ops_triton import rope

        t = qkv.shape[0]
        q, k, v = _split_qkv(qkv, heads, kv_heads, head_dim)
        qo = qkv.new_empty(t, heads, head_dim)
        ko, vo = qkv.new_empty(t, kv_heads, head_dim), qkv.new_empty(t, kv_heads, head_dim)
        rope(q, k, v, cos, sin, qo, ko, vo, sign=1)
        ctx.save_for_backward(cos, sin)
        ctx.shape = (heads, kv_heads, head_dim)
        return qo, ko, vo

    @staticmethod
    def backward(ctx, dq, dk, dv):
        from tinkerbell.engine.kernels._train_ops_triton import rope

        cos, sin = ctx.saved_tensors
        heads, kv_heads, head_dim = ctx.shape
        dqkv = dq.new_empty(dq.shape[0], (heads + 2 * kv_heads) * head_dim)
        gq, gk, gv = _split_qkv(dqkv, heads, kv_heads, head_dim)
        dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
        rope(dq, dk, dv, cos, sin, gq, gk, gv, sign=-1)  # the rotation is orthogonal: its inverse is its transpose
        return dqkv, None, None, None, None, None


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(g) · u for gate_up = [g | u] along the last dim."""
    if _fused(gate_up) and gate_up.stride(-1) == 1:
        return _SiluMul.apply(gate_up)
    return silu_mul_torch(gate_up)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        from tinkerbell.engine.kernels._train_ops_triton import silu_mul_forward

        ctx.save_for_backward(gate_up)
        return silu_mul_forward(gate_up)

    @staticmethod
    def backward(ctx, dh):
        from tinkerbell.engine.kernels._train_ops_triton import silu_mul_bwd

        (gate_up,) = ctx.saved_tensors
        return silu_mul_bwd(gate_up, dh if dh.stride(-1) == 1 else dh.contiguous())


def target_logprobs(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[rows, ids] in float32, for logits [R, V] in the model's dtype. The torch form copies
    the logits to float32 and autograd keeps and replays several [R, V] float32 tensors; the kernels read the
    logits once forward (a one-pass logsumexp per row) and once backward (softmax times the row's gradient,
    written straight in the logits' dtype)."""
    if _fused(logits) and logits.stride(-1) == 1:
        return _TargetLogprobs.apply(logits, rows, ids)
    return target_logprobs_torch(logits, rows, ids)


def target_logprobs_torch(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits[rows, ids] - torch.logsumexp(logits, dim=-1)[rows]


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows, ids):
        from tinkerbell.engine.kernels._train_ops_triton import row_logsumexp

        lse = row_logsumexp(logits)
        ctx.save_for_backward(logits, lse, rows, ids)
        return logits[rows, ids].float() - lse[rows]

    @staticmethod
    def backward(ctx, d_lp):
        from tinkerbell.engine.kernels._train_ops_triton import softmax_scale

        logits, lse, rows, ids = ctx.saved_tensors
        # d/dlogits of lp = onehot(row, id) − softmax(row), summed over the row's target pairs
        per_row = torch.zeros_like(lse).index_add_(0, rows, d_lp.float())
        grad = softmax_scale(logits, lse, per_row.neg_())
        grad.index_put_((rows, ids), d_lp.to(grad.dtype), accumulate=True)
        return grad, None, None
