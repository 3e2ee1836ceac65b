"""The fused multi-adapter LoRA of training (training_lora.py) computes what the per-segment reference computes:
outputs, the input's gradient and every master's gradient, accumulated over calls (float32)."""

from __future__ import annotations

import pytest
import torch

from tinkerbell.engine import training_lora, training_params
from tinkerbell.engine.lora import AdapterWeights, LoraSegment, LoraSpec
from tinkerbell.engine.training_lora import TrainLora

KEYS = ("q", "k", "v")
WIDTHS = {"q": 12, "k": 4, "v": 4}


def _adapter(rank: int, keys: tuple[str, ...], seed: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    w = AdapterWeights(spec=LoraSpec(rank=rank, alpha=rank * (1 + seed)))
    for k in keys:
        w.a[k] = torch.randn(rank, 10, generator=g).requires_grad_(True)
        w.b[k] = torch.randn(WIDTHS[k], rank, generator=g).requires_grad_(True)
    return w


def _clone(w: AdapterWeights) -> AdapterWeights:
    return AdapterWeights(spec=w.spec, a={k: t.detach().clone().requires_grad_(True) for k, t in w.a.items()},
                          b={k: t.detach().clone().requires_grad_(True) for k, t in w.b.items()})


def _run(adapters: list[AdapterWeights], bounds: list[tuple[int, int]], fused: bool, x0: torch.Tensor,
         base0: torch.Tensor, calls: int, row_offset: int = 0) -> torch.Tensor:
    """`calls` forward/backward passes of a fused q/k/v projection; returns the last input gradient."""
    lora = TrainLora([LoraSegment(s, e, w) for (s, e), w in zip(bounds, adapters)], fused=fused)
    for i in range(calls):
        x = x0.clone().requires_grad_(True)
        out = lora.add(KEYS, x, base0.clone(), row_offset=row_offset)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(10 + i))
        (out * upstream).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("segment_min_rows", [1, 10**9], ids=["per-run-matmuls", "stacked-with-scale-matrix"])
def test_fused_lora_equals_reference_across_runs_ranks_and_missing_modules(monkeypatch, segment_min_rows):
    """Three runs of ranks 2, 4, 3 over ragged rows, one of them without a v adapter, a gap of rows no run
    adapts, and two calls (the second accumulates into the masters' gradients); both ways of running several
    runs at once."""
    monkeypatch.setattr(training_lora, "SEGMENT_MIN_ROWS", segment_min_rows)
    _check_two_calls([_adapter(2, KEYS, 0), _adapter(4, ("q", "k"), 1), _adapter(3, KEYS, 2)],
                     [(0, 3), (3, 8), (10, 13)], seed=5)


def _check_two_calls(adapters: list[AdapterWeights], bounds: list[tuple[int, int]], seed: int) -> None:
    """Two fused calls over rows `bounds` give the reference's outputs, input gradients and accumulated
    master gradients."""
    g = torch.Generator().manual_seed(seed)
    n = bounds[-1][1]
    x0, base0 = torch.randn(n, 10, generator=g), torch.randn(n, 20, generator=g)
    ref = [_clone(w) for w in adapters]
    want_out, want_dx = _run(ref, bounds, False, x0, base0, calls=2)
    got_out, got_dx = _run(adapters, bounds, True, x0, base0, calls=2)
    assert torch.allclose(got_out, want_out, atol=1e-5) and torch.allclose(got_dx, want_dx, atol=1e-5)
    for w, r in zip(adapters, ref):
        for got, want in zip(w.parameters(), r.parameters()):
            assert torch.allclose(got.grad, want.grad, rtol=1e-5, atol=1e-5)
            # laid out as the master, or the optimizer's multi-tensor kernels leave their fast path
            assert got.grad.is_contiguous()


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 4, 3)], ids=["equal-ranks", "mixed-ranks"])
def test_stacked_gradients_of_several_runs_are_contiguous(monkeypatch, ranks):
    monkeypatch.setattr(training_lora, "SEGMENT_MIN_ROWS", 10**9)
    adapters = [_adapter(r, KEYS, i) for i, r in enumerate(ranks)]
    g = torch.Generator().manual_seed(8)
    _run(adapters, [(0, 4), (4, 9), (9, 12)], True, torch.randn(12, 10, generator=g),
         torch.randn(12, 20, generator=g), calls=1)
    assert all(t.grad.is_contiguous() for w in adapters for t in w.parameters())


def test_fused_lora_on_a_row_chunk_of_one_run_uses_its_scale():
    """The LM head's chunks: rows [4, 9) of a run that spans the whole batch, addressed by row offset."""
    w = _adapter(3, KEYS, 3)
    ref = _clone(w)
    g = torch.Generator().manual_seed(6)
    x0, base0 = torch.randn(5, 10, generator=g), torch.randn(5, 20, generator=g)
    want_out, want_dx = _run([ref], [(0, 12)], False, x0, base0, calls=1, row_offset=4)
    got_out, got_dx = _run([w], [(0, 12)], True, x0, base0, calls=1, row_offset=4)
    assert torch.allclose(got_out, want_out, atol=1e-5) and torch.allclose(got_dx, want_dx, atol=1e-5)
    for got, want in zip(w.parameters(), ref.parameters()):
        assert torch.allclose(got.grad, want.grad, rtol=1e-5, atol=1e-5)


def test_fused_lora_leaves_a_frozen_runs_tensors_without_gradient():
    """A forward-only run's adapter enters as detached views: it adds its delta but gets no gradient."""
    trained, frozen = _adapter(2, KEYS, 0), _adapter(2, KEYS, 1)
    views = AdapterWeights(spec=frozen.spec, a={k: t.detach() for k, t in frozen.a.items()},
                           b={k: t.detach() for k, t in frozen.b.items()})
    g = torch.Generator().manual_seed(7)
    _run([trained, views], [(0, 2), (2, 5)], True, torch.randn(5, 10, generator=g), torch.randn(5, 20, generator=g),
         calls=1)
    assert all(t.grad is not None for t in trained.parameters())
    assert all(t.grad is None for t in frozen.parameters())


@pytest.mark.parametrize("segment_min_rows", [1, 10**9], ids=["per-run-matmuls", "stacked-with-scale-matrix"])
def test_fused_linear_with_its_frozen_base_equals_reference(monkeypatch, segment_min_rows):
    """`TrainLora.linear`: the base matmul (with bias) inside the fused node, its input gradient and the
    adapters' summed in one place."""
    monkeypatch.setattr(training_lora, "SEGMENT_MIN_ROWS", segment_min_rows)
    g = torch.Generator().manual_seed(12)
    weight, bias = torch.randn(20, 10, generator=g), torch.randn(20, generator=g)
    adapters = [_adapter(2, KEYS, 0), _adapter(3, KEYS, 1)]
    ref = [_clone(w) for w in adapters]
    x0 = torch.randn(9, 10, generator=g)
    results = []
    for ws, fused in ((ref, False), (adapters, True)):
        lora = TrainLora([LoraSegment(0, 4, ws[0]), LoraSegment(4, 9, ws[1])], fused=fused)
        x = x0.clone().requires_grad_(True)
        out = lora.linear(KEYS, x, weight, bias)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(13))).sum().backward()
        results.append((out.detach(), x.grad))
    assert torch.allclose(results[1][0], results[0][0], atol=1e-5)
    assert torch.allclose(results[1][1], results[0][1], atol=1e-5)
    for w, r in zip(adapters, ref):
        for got, want in zip(w.parameters(), r.parameters()):
            assert torch.allclose(got.grad, want.grad, rtol=1e-5, atol=1e-5)


def _count_segmented(monkeypatch) -> list[int]:
    calls = [0]
    real = training_lora.SegmentedLoraAdd.apply

    def spy(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(training_lora.SegmentedLoraAdd, "apply", spy)
    return calls


@pytest.mark.parametrize("packed", [False, True], ids=["separate-masters", "packed-masters"])
def test_segmented_lora_of_several_runs_equals_reference(monkeypatch, packed):
    """Three runs of one rank and different scales tiling the rows: the exact several-run form (one grouped
    matmul per step, training_lora_segmented.py) gives the reference's outputs and gradients, over two calls."""
    calls = _count_segmented(monkeypatch)
    adapters = [_adapter(3, KEYS, i) for i in range(3)]
    if packed:
        adapters = [training_params.pack(w) for w in adapters]
    _check_two_calls(adapters, [(0, 4), (4, 5), (5, 13)], seed=9)
    assert calls[0] == 2


@pytest.mark.parametrize("form", ["linear", "row-chunk"])
def test_segmented_form_with_its_base_inside_or_on_a_row_chunk_equals_reference(monkeypatch, form):
    """`TrainLora.linear` (the frozen base matmul inside the node) over rows its runs tile; and `add` on rows
    [3, 11) of a 14-row batch (an LM-head chunk), which cuts two of the three runs."""
    calls = _count_segmented(monkeypatch)
    g = torch.Generator().manual_seed(14)
    weight = torch.randn(20, 10, generator=g)
    adapters = [_adapter(2, KEYS, i) for i in range(3)]
    ref = [_clone(w) for w in adapters]
    bounds, offset = ([(0, 2), (2, 3), (3, 8)], 0) if form == "linear" else ([(0, 5), (5, 6), (6, 14)], 3)
    x0 = torch.randn(8, 10, generator=g)
    results = []
    for ws, fused in ((ref, False), (adapters, True)):
        lora = TrainLora([LoraSegment(s, e, w) for (s, e), w in zip(bounds, ws)], fused=fused)
        x = x0.clone().requires_grad_(True)
        out = lora.linear(KEYS, x, weight) if form == "linear" else lora.add(KEYS, x, x @ weight.t(), offset)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(15))).sum().backward()
        results.append((out.detach(), x.grad))
    assert calls[0] == 1
    assert torch.allclose(results[1][0], results[0][0], atol=1e-5)
    assert torch.allclose(results[1][1], results[0][1], atol=1e-5)
    for w, r in zip(adapters, ref):
        for got, want in zip(w.parameters(), r.parameters()):
            assert torch.allclose(got.grad, want.grad, rtol=1e-5, atol=1e-5)


def test_rows_of_adjacent_tensors_is_a_view_and_of_others_a_copy():
    buf = torch.arange(24.0)
    parts = [buf[0:8].view(2, 4), buf[8:20].view(3, 4)]
    rows = training_lora._rows_of(parts)
    assert rows.data_ptr() == buf.data_ptr() and torch.equal(rows, buf[:20].view(5, 4))
    apart = [buf[0:8].view(2, 4), buf[12:16].view(1, 4)]
    assert torch.equal(training_lora._rows_of(apart), torch.cat(apart))
