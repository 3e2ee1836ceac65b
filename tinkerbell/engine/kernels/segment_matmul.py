"""Matmuls over a packed batch whose rows come in segments, each segment with its own weight: the several-run
LoRA of a training step (each run's rows against its own adapter) in a fixed number of launches, exact work.

- `segment_mm(x, w, seg)`: y[rows of g] = x[rows of g] · w[g] (w [G, K, N]);
- `segment_mm_add_(out, y, w, seg)`: out[rows of g] += y[rows of g] · w[g], in place (the LoRA expand, which adds
  into the base projection's output without a delta tensor and a second pass);
- `segment_outer(a, b, seg)`: per segment a[:, rows of g] · b[rows of g] → [G, M, N] (the weights' gradients,
  a reduction over each segment's rows).

On a Hopper GPU in bf16 the first and last are `torch._grouped_mm` (CUTLASS grouped GEMM) and the in-place add
is a Triton kernel over row tiles that never straddle a segment; elsewhere (the CPU, float32 checks, shapes
the grouped GEMM refuses) each is a loop of plain matmuls over the segments, which is also their reference.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from tinkerbell.engine.kernels import use_triton

TILE_M = 64  # rows per tile of the in-place add
# Why the grouped GEMM was given up for the loop, if it was: it refused operands that `_grouped` let through (a
# constraint of another torch version); the step goes on, slower, and the benches print this.
GROUPED_REFUSED: str | None = None
# The same for the Triton in-place add (a compiler of another version refusing it).
ADD_KERNEL_FAILED: str | None = None

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segments:
    """Contiguous row ranges [bounds[g], bounds[g + 1]) covering all rows of the call, segment g using weight g."""

    bounds: tuple[int, ...]  # G + 1 row offsets, bounds[0] == 0
    offs: torch.Tensor  # int32 [G] on the device: each segment's end row (the grouped GEMM's offsets)
    tiles: torch.Tensor  # int32 [NT, 3] on the device: (segment, first row, rows) of each add tile

    @classmethod
    def build(cls, bounds: list[int], device: torch.device) -> "Segments":
        tiles = [(g, t0, min(TILE_M, e - t0)) for g, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))
                 for t0 in range(s, e, TILE_M)]
        host = np.asarray(tiles, np.int32).reshape(-1, 3)
        return cls(tuple(bounds), torch.tensor(bounds[1:], dtype=torch.int32).to(device, non_blocking=True),
                   torch.from_numpy(host).to(device, non_blocking=True))

    @functools.cached_property
    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds[:-1], self.bounds[1:]))


@functools.lru_cache(maxsize=None)
def _grouped_mm_device(index: int) -> bool:
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(index)[0] == 9


def _grouped(*ts: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these operands: bf16 on a Hopper GPU, 16-byte aligned pointers and
    leading strides (it refuses anything else)."""
    t0 = ts[0]
    if GROUPED_REFUSED is not None or t0.device.type != "cuda" or any(t.dtype != torch.bfloat16 for t in ts):
        return False
    if not _grouped_mm_device(t0.device.index if t0.device.index is not None else torch.cuda.current_device()):
        return False
    for t in ts:
        if t.data_ptr() % 16:
            return False
        inner = t.stride()[-2:]
        if 1 not in inner or any(s % 8 for s in inner if s != 1) or any(s % 8 for s in t.stride()[:-2]):
            return False
    return True


def _refused(e: RuntimeError) -> None:
    global GROUPED_REFUSED
    GROUPED_REFUSED = str(e).splitlines()[0]
    log.warning("torch._grouped_mm refused the LoRA segments' operands (%s); using a loop of matmuls instead",
                GROUPED_REFUSED)


def _try_grouped(a: torch.Tensor, b: torch.Tensor, seg: Segments) -> torch.Tensor | None:
    """`torch._grouped_mm(a, b, offs)` where it takes the operands, else None (the caller loops)."""
    if _grouped(a, b):
        try:
            return torch._grouped_mm(a, b, offs=seg.offs)
        except RuntimeError as e:
            _refused(e)
    return None


def segment_mm(x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
    """x [T, K], w [G, K, N] (any strides) -> [T, N], rows of segment g times w[g]."""
    out = _try_grouped(x, w, seg)
    if out is None:
        out = x.new_empty(x.shape[0], w.shape[2])
        for g, (s, e) in enumerate(seg.ranges):
            torch.mm(x[s:e], w[g], out=out[s:e])
    return out


def segment_outer(a: torch.Tensor, b: torch.Tensor, seg: Segments) -> torch.Tensor:
    """a [M, T], b [T, N] -> [G, M, N]: out[g] = a[:, rows of g] · b[rows of g]."""
    out = _try_grouped(a, b, seg)
    if out is None:
        out = a.new_empty(len(seg.ranges), a.shape[0], b.shape[1])
        for g, (s, e) in enumerate(seg.ranges):
            torch.mm(a[:, s:e], b[s:e], out=out[g])
    return out


def segment_mm_add_(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
    """out [T, N] += rows of segment g of y [T, K] times w[g] ([G, K, N], any strides); returns `out`."""
    global ADD_KERNEL_FAILED
    if ADD_KERNEL_FAILED is None and use_triton(out) and out.stride(-1) == 1 and y.stride(-1) == 1:
        from tinkerbell.engine.kernels._segment_matmul_triton import mm_add

        try:
            mm_add(out, y, w, seg.tiles)
            return out
        except Exception as e:  # noqa: BLE001 - compiler errors have no common base; nothing was written yet
            ADD_KERNEL_FAILED = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("the segment add kernel failed (%s); using a loop of matmuls instead", ADD_KERNEL_FAILED)
    return segment_mm_add_torch(out, y, w, seg)


def segment_mm_add_torch(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
    for g, (s, e) in enumerate(seg.ranges):
        out[s:e].addmm_(y[s:e], w[g])
    return out
