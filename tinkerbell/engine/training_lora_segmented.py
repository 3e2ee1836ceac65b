"""The several-run form of the fused training LoRA (training_lora.py): each run's rows against its own adapter
only (exact work, as if each run were alone), in a fixed number of launches however many runs.

Per projection (q/k/v together, gate/up together) over G runs of contiguous rows:
forward   xa = x · A_g (one grouped GEMM, every module's A side by side), scaled; per module
          out[:, cols] += xa[:, rank cols] · B_gᵀ in place (one tiled kernel);
backward  per module d_xa = dy · B_g and ∇B_g = dyᵀ · xa over the run's rows; dx += d_xa · A_g in place;
          ∇A_g = d_xaᵀ · x over the run's rows (grouped GEMMs whose reduction runs over each run's rows).
The stacked form (every adapter applied to every row, a scale matrix zeroing the products outside each run's
rows) does G times the LoRA FLOPs: on the 1B model at 8 runs that is ~12 ms of a ~110 ms step.
kernels/segment_matmul.py holds the matmuls (grouped GEMM and a Triton kernel on a Hopper GPU, a loop of
matmuls elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tinkerbell.engine.kernels.segment_matmul import Segments, segment_mm, segment_mm_add_, segment_outer


@dataclass(frozen=True)
class SegmentPlan:
    """G runs' contiguous rows, J modules side by side in the output; masters come run-major (run g's A, B of
    module 0, then of module 1, ...)."""

    widths: tuple[int, ...]  # output width of each module
    ranks: tuple[int, ...]  # each module's rank (the same for every run)
    segments: Segments
    scale: float | torch.Tensor  # one scale for all runs, or [rows, 1] per row

    @property
    def runs(self) -> int:
        return len(self.segments.bounds) - 1


def give_grad(m: torch.Tensor, grad: torch.Tensor, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Hand master `m` its gradient: as its first `.grad` (no copy), else queued for one multi-tensor add."""
    if m.grad is None:
        m.grad = grad
    else:
        dst.append(m.grad)
        src.append(grad)


class SegmentedLoraAdd(torch.autograd.Function):
    """out[rows of run g] += Σ_modules scale · (x · A_gjᵀ) · B_gjᵀ; `out` given (updated in place) or the frozen
    base `F.linear(x, weight, bias)` computed here. After the plan: the masters run-major (A, B of each module;
    they receive the gradients, set here, not through autograd), every run's A's side by side in x's dtype
    ([G, R, in]), each module's B's ([G, width, rank], any strides: views of the runs' packed buffers where they
    allow), and one master per run as autograd's input, which says whether the run trains (a run's masters all
    do, or none: a forward-only run's are detached views). One input per run rather than every master: each
    leaf input is a node autograd visits in every backward (~1,800 for 8 runs on the 1B model)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor | None, weight: torch.Tensor | None,
                bias: torch.Tensor | None, plan: SegmentPlan, masters: tuple[torch.Tensor, ...], a3: torch.Tensor,
                *tensors: torch.Tensor) -> torch.Tensor:
        modules = len(plan.widths)
        b3s = tensors[:modules]
        seg = plan.segments
        if out is None:
            assert weight is not None and not weight.requires_grad, "the base weight must be frozen"
            out = F.linear(x, weight, bias)
        else:
            ctx.mark_dirty(out)
        xa = segment_mm(x, a3.transpose(1, 2), seg).mul_(plan.scale)  # [rows, R]
        col, rc = 0, 0
        for w, r, b3 in zip(plan.widths, plan.ranks, b3s):
            segment_mm_add_(out[:, col:col + w], xa[:, rc:rc + r], b3.transpose(1, 2), seg)
            col, rc = col + w, rc + r
        # The masters are leaves: holding them (for their .grad) makes no reference cycle.
        ctx.plan, ctx.masters, ctx.given_out = plan, masters, weight is None
        ctx.save_for_backward(x, weight, xa, a3, *b3s)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        plan: SegmentPlan = ctx.plan
        masters = ctx.masters
        seg, runs, modules = plan.segments, plan.runs, len(plan.widths)
        x, weight, xa, a3, *b3s = ctx.saved_tensors
        trains = ctx.needs_input_grad[7 + modules:]  # per run
        d_parts, g_b, col, rc = [], [], 0, 0
        for w, r, b3 in zip(plan.widths, plan.ranks, b3s):
            dyj = dy[:, col:col + w] if modules > 1 else dy
            d_parts.append(segment_mm(dyj, b3, seg))  # [rows, rank]
            g_b.append(segment_outer(dyj.t(), xa[:, rc:rc + r], seg) if any(trains) else None)  # [G, width, rank]
            col, rc = col + w, rc + r
        d_xa = (torch.cat(d_parts, dim=1) if modules > 1 else d_parts[0]).mul_(plan.scale)
        dx = None
        if ctx.needs_input_grad[0]:
            if weight is not None:
                dx = segment_mm_add_(dy @ weight, d_xa, a3, seg)
            else:
                dx = segment_mm(d_xa, a3, seg)
        if any(trains):
            dtype = masters[0].dtype
            g_a = segment_outer(d_xa.t(), x, seg).to(dtype)  # [G, R, in]
            # views made a few at a time (unbind/split), not one indexing op per master
            g_b = [g.to(dtype).unbind(0) for g in g_b]
            dst: list[torch.Tensor] = []
            src: list[torch.Tensor] = []
            for g, g_a_run in enumerate(g_a.unbind(0)):
                if not trains[g]:
                    continue
                for j, ga in enumerate(g_a_run.split(plan.ranks) if modules > 1 else (g_a_run,)):
                    at = 2 * (g * modules + j)
                    give_grad(masters[at], ga, dst, src)
                    give_grad(masters[at + 1], g_b[j][g], dst, src)
            if dst:
                torch._foreach_add_(dst, src)
        return (dx, dy if ctx.given_out else None, None, None, None, None, None) + (None,) * (modules + runs)
