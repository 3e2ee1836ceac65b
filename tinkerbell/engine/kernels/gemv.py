"""`linear` for one row: a Triton GEMV on the GPU where cuBLAS's M=1 kernels leave bandwidth unused.

At batch 1 every projection is a matrix-vector product that should stream its weight at HBM speed. Measured on
an H100 (bench/decode_probe.py, weights rotated past L2): cuBLAS reaches 1.3 TB/s on a 2048×2048 weight and
2.97 TB/s on the 128k-row unembedding, where this kernel reaches 1.5 and 3.16 TB/s; on the other shapes the two
are within a few percent, so the model uses it for o_proj and the LM head only. Anything else (more rows,
autograd, a bias, the CPU) is plain F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinkerbell.engine.kernels import use_triton


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); a single-row, bias-free product outside autograd runs the Triton GEMV."""
    if (bias is None and x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype and x.is_contiguous()
            and weight.is_contiguous() and not torch.is_grad_enabled() and use_triton(x)):
        from tinkerbell.engine.kernels._gemv_triton import launch

        return launch(x, weight)
    return F.linear(x, weight, bias)
