"""`linear` for one row: a Triton GEMV on the GPU, so a batch-1 decode step is a chain of Triton kernels.

At batch 1 every projection is a matrix-vector product that should stream its weight at HBM speed. Measured on
an H100 (bench/decode_probe.py, weights rotated past L2): cuBLAS reaches 1.3 TB/s on a 2048×2048 weight and
2.97 TB/s on the 128k-row unembedding, where this kernel reaches 1.5 and 3.16 TB/s; on the other 1B/8B shapes
the two are within a few percent. With programmatic dependent launch (Hopper, _pdl_triton.py) it runs for every
projection, since its launches then overlap their neighbours' and cuBLAS's do not; without, only where it wins
alone (`wins_alone`: o_proj and the LM head). Anything else (more rows, autograd, the CPU) is plain F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinkerbell.engine.kernels import use_pdl, use_triton


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           wins_alone: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias); a single-row product outside autograd runs the Triton GEMV under PDL, or where
    the caller says it `wins_alone`. Under PDL the GEMV may read `weight` before the previous kernel has
    finished: pass model weights, not a tensor that the kernel just before computed."""
    if (x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype and x.is_contiguous()
            and weight.is_contiguous() and (bias is None or bias.is_contiguous()) and not torch.is_grad_enabled()
            and use_triton(x) and (wins_alone or use_pdl(x))):
        from tinkerbell.engine.kernels._gemv_triton import launch

        return launch(x, weight, bias)
    return F.linear(x, weight, bias)
