"""Segment matmuls (kernels/segment_matmul.py): each segment's rows against its own weight, checked against one
plain matmul per segment (float32); the in-place add also through the Triton kernel under the interpreter."""

from __future__ import annotations

import torch

from tests.engine.test_kernels import backend  # noqa: F401 - the torch / triton-interpret fixture
from tinkerbell.engine.kernels import segment_matmul as sm

BOUNDS = [0, 3, 70, 71, 140]  # ragged, one segment of a single row, tiles that end mid-segment


def _segments() -> sm.Segments:
    return sm.Segments.build(BOUNDS, torch.device("cpu"))


def test_segment_mm_is_each_segments_rows_times_its_weight():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(140, 24, generator=g), torch.randn(4, 24, 8, generator=g)
    got = sm.segment_mm(x, w, _segments())
    for i, (s, e) in enumerate(zip(BOUNDS[:-1], BOUNDS[1:])):
        assert torch.allclose(got[s:e], x[s:e] @ w[i], atol=1e-5)


def test_segment_outer_reduces_over_each_segments_rows():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(140, 6, generator=g), torch.randn(140, 24, generator=g)
    got = sm.segment_outer(a.t(), b, _segments())
    assert got.shape == (4, 6, 24)
    for i, (s, e) in enumerate(zip(BOUNDS[:-1], BOUNDS[1:])):
        assert torch.allclose(got[i], a[s:e].t() @ b[s:e], atol=1e-5)


def test_segment_mm_add_adds_in_place_with_strided_operands(backend):  # noqa: F811
    """The LoRA expand's shapes: `out` a column slice of a wider output, the weight a transposed stack."""
    g = torch.Generator().manual_seed(2)
    full = torch.randn(140, 300, generator=g)
    y = torch.randn(140, 40, generator=g)[:, 8:40]  # rank 32 columns of a wider xa
    w = torch.randn(4, 200, 32, generator=g).transpose(1, 2)  # [G, rank, width] view of [G, width, rank]
    want = full.clone()
    for i, (s, e) in enumerate(zip(BOUNDS[:-1], BOUNDS[1:])):
        want[s:e, 50:250] += y[s:e] @ w[i]
    got = full.clone()
    out = sm.segment_mm_add_(got[:, 50:250], y, w, _segments())
    assert out.data_ptr() == got[:, 50:250].data_ptr()
    assert torch.allclose(got, want, atol=1e-4)
    assert sm.ADD_KERNEL_FAILED is None  # the kernel ran (a failing one falls back to the loop, quietly correct)


def test_segment_tiles_never_straddle_a_segment():
    tiles = _segments().tiles.tolist()
    for g, start, n in tiles:
        assert BOUNDS[g] <= start and start + n <= BOUNDS[g + 1] and 0 < n <= sm.TILE_M
    assert sum(n for _, _, n in tiles) == BOUNDS[-1]
