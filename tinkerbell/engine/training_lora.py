"""LoRA in the training forward: each row of the packed batch adds its own run's adapter delta to a projection.

Two forms compute the same sums:

- the reference (`fused=False`, CPU default): per segment and module, `(x[s:e] @ A.T) @ B.T * scale` in the
  activations' dtype, autograd flowing through the casts to the fp32 masters;
- the fused form (`fused=True`, GPU default): one autograd node per projection (q/k/v together, gate/up
  together) for all runs at once. Its forward is, per row group, one shrink GEMM over the group's (module, run)
  A's stacked along the rank, a scale, and per module one expand GEMM that adds into the base projection's
  output in place (`addmm_`: no delta tensor, no separate add). Row groups: one per run when every run has at
  least `SEGMENT_MIN_ROWS` rows (exact work), else one over all rows whose scale is a [rows, Σ rank] matrix with
  each run's scale on its own rows and zero elsewhere (few launches however many runs, Σ rank of wasted
  columns). Its backward is a handful of GEMMs per group and adds the masters' gradients itself, with one
  multi-tensor add per projection, instead of autograd copying each run's gradient slice out one kernel at a
  time (the second session counted ~900 such copies in an 8-run step on the 1B model). Several runs of one rank
  whose rows tile the call take the segmented form instead (training_lora_segmented.py: each run's rows through
  its own adapter only, grouped GEMMs, a fixed number of launches, no scale matrix).

The matmuls use the masters cast to the activations' dtype once per micro-batch from each run's packed buffer
(training_params.py), and for the segmented form every run's A's and B's are views of one [runs, N] cast.

Why not autograd through concatenated masters: the eager chain of casts, scales and adds runs an elementwise pass
over the full [rows, out] output per module (twice on the backward), which for gate/up alone is 2 × 128 MB a
layer at 8k tokens on the 1B model, and the per-run gradient slices need one copy each.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from tinkerbell.engine.kernels.segment_matmul import Segments
from tinkerbell.engine.lora import LoraSegment
from tinkerbell.engine.training_lora_segmented import SegmentPlan, SegmentedLoraAdd, give_grad
from tinkerbell.engine.training_params import views_like

# Several runs in one call: when every run has at least this many rows, each run's rows go through its own
# adapter's matmuls (exact work, a few launches per run); below it one set of matmuls over all rows with every
# run's adapter stacked along the rank, a scale matrix zeroing the products outside each run's rows (few
# launches, Σ rank of wasted columns). Measured on an H100 (docs/benchmarks.md, fifth session), 8 runs × 1,024
# rows: stacked 28.6k tokens/s on the 1B model and 12.5k on the 8B, per-run 14.7k and 10.0k (the step is
# launch-bound, and per-run matmuls multiply the launches), hence a threshold only very long runs reach.
SEGMENT_MIN_ROWS = 8192
# Several runs whose rows tile the call and whose adapters have one rank: each run's rows against its own adapter
# in a fixed number of launches (training_lora_segmented.py) instead of either form above.
SEGMENTED = True


class TrainLora:
    """`ctx.lora` for training: rows [start, end) use their segment's adapter."""

    def __init__(self, segments: list[LoraSegment], fused: bool = False):
        self.segments = [s for s in segments if s.weights is not None]
        self.fused = fused
        self._scales: dict[tuple, torch.Tensor] = {}
        self._row_segment: torch.Tensor | None = None  # [batch rows] int32: each row's segment (-1: none)
        self._low: dict[int, torch.Tensor] = {}  # segment -> its packed masters cast to the activations' dtype
        self._plans: dict[tuple, tuple[Segments, float | torch.Tensor]] = {}  # the exact several-run form's rows
        self._buffers: dict[torch.dtype, torch.Tensor | None] = {}  # every run's packed buffer cast, a row each

    def _cast(self, i: int, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Segment i's master `t` in `dtype`, outside autograd: a view of one cast of the run's whole packed
        buffer (made once per micro-batch, reused by every projection and by a recompute), else its own cast."""
        flat = self.segments[i].weights.flat
        if flat is None:
            return t.detach().to(dtype)
        low = self._low.get(i)
        if low is None or low.dtype != dtype:
            low = self._low[i] = flat.detach().to(dtype)
        return views_like(low, flat, [t])[0]

    def _live(self, key: str, row_offset: int, n: int) -> tuple[int, ...]:
        return tuple(i for i, seg in enumerate(self.segments) if key in seg.weights.a
                     and min(seg.end - row_offset, n) > max(seg.start - row_offset, 0))

    def apply(self, key: str, x: torch.Tensor, out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
        """`out` (the base linear's output for module `key`) plus each row's adapter delta."""
        return self.add((key,), x, out, row_offset)

    def linear(self, keys: tuple[str, ...], x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen projection `F.linear(x, weight, bias)` of modules `keys` (side by side: a fused q/k/v or
        gate/up weight) plus each row's adapter deltas. The fused form runs the base matmul inside its own
        autograd node, so the backward adds the adapters' input gradient into the base's (one GEMM epilogue)
        instead of autograd summing two [rows, in] gradients in a separate pass."""
        if not self.fused:
            return self.add(keys, x, F.linear(x, weight, bias))
        live = [self._live(k, 0, x.shape[0]) for k in keys]
        if not any(live):
            return F.linear(x, weight, bias)
        return self._fused(keys, self._widths(keys, live, weight.shape[0]), live, x, None, 0, (weight, bias))

    def add(self, keys: tuple[str, ...], x: torch.Tensor, out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
        """`out` [n, Σ widths] holds the base outputs of modules `keys` side by side (a fused q/k/v or gate/up
        projection); returns it plus each row's adapter deltas. The fused form updates `out` in place."""
        n = x.shape[0]
        live = [self._live(k, row_offset, n) for k in keys]
        if not any(live):
            return out
        widths = self._widths(keys, live, out.shape[1])
        if not self.fused:
            pieces = out.split(widths, dim=-1) if len(keys) > 1 else (out,)
            done = [self._reference(k, x, p, row_offset, ls) for k, p, ls in zip(keys, pieces, live)]
            return done[0] if len(done) == 1 else torch.cat(done, dim=-1)
        return self._fused(keys, widths, live, x, out, row_offset)

    def _widths(self, keys: tuple[str, ...], live: list[tuple[int, ...]], total: int) -> list[int]:
        widths = [self.segments[ls[0]].weights.b[k].shape[0] if ls else None for k, ls in zip(keys, live)]
        if None in widths:  # a module no segment adapts: its width from the split of the output
            # (adapters target q/k/v and gate/up as groups, so at most one of a projection's modules is bare)
            assert widths.count(None) == 1, f"cannot split the output among {keys}: several have no adapter"
            known = sum(w for w in widths if w is not None)
            widths = [w if w is not None else total - known for w in widths]
        return widths

    def _reference(self, key: str, x: torch.Tensor, out: torch.Tensor, row_offset: int,
                   live: tuple[int, ...]) -> torch.Tensor:
        n = x.shape[0]
        parts: list[tuple[int, int, torch.Tensor]] = []
        for i in live:
            seg = self.segments[i]
            w = seg.weights
            s, e = max(seg.start - row_offset, 0), min(seg.end - row_offset, n)
            a, b = w.a[key].to(x.dtype), w.b[key].to(x.dtype)
            parts.append((s, e, (x[s:e] @ a.t()) @ b.t() * w.spec.scale))
        if not parts:
            return out
        if len(parts) == 1 and parts[0][0] == 0 and parts[0][1] == n:
            return out + parts[0][2].to(out.dtype)
        pieces, cursor = [], 0
        for s, e, delta in parts:
            if s > cursor:
                pieces.append(delta.new_zeros(s - cursor, delta.shape[1]))
            pieces.append(delta)
            cursor = e
        if cursor < n:
            pieces.append(pieces[-1].new_zeros(n - cursor, pieces[-1].shape[1]))
        return out + torch.cat(pieces).to(out.dtype)

    def _fused(self, keys: tuple[str, ...], widths: list[int], live: list[tuple[int, ...]], x: torch.Tensor,
               out: torch.Tensor | None, row_offset: int,
               base: tuple[torch.Tensor, torch.Tensor | None] = (None, None)) -> torch.Tensor:
        n = x.shape[0]
        segs = sorted({i for ls in live for i in ls})
        bounds = {i: (max(self.segments[i].start - row_offset, 0), min(self.segments[i].end - row_offset, n))
                  for i in segs}
        plan = self._segment_plan(widths, live, segs, bounds, n, x.device) if len(segs) > 1 else None
        if plan is not None:
            ws = [self.segments[i].weights for i in segs]
            run_major = tuple(t for w in ws for k in keys for t in (w.a[k], w.b[k]))
            a3, b3s = self._stacked(keys, segs, x.dtype)
            return SegmentedLoraAdd.apply(x, out, *base, plan, run_major, a3, *b3s, *(w.a[keys[0]] for w in ws))
        masters: list[torch.Tensor] = []
        owners: list[int] = []  # each master's segment
        first: dict[int, int] = {}  # segment -> its first master
        index: dict[tuple[int, int], int] = {}  # (module, segment) -> its (A, B) pair's place in `masters`
        for j, (k, ls) in enumerate(zip(keys, live)):
            for i in ls:
                index[(j, i)] = len(masters) // 2
                first.setdefault(i, len(masters))
                masters += [self.segments[i].weights.a[k], self.segments[i].weights.b[k]]
                owners += [i, i]
        # the masters in x's dtype, which the matmuls use
        lows = [self._cast(i, m, x.dtype) for i, m in zip(owners, masters)]
        if len(segs) == 1 or min(e - s for s, e in bounds.values()) >= SEGMENT_MIN_ROWS:
            # exact: each segment's rows against its own adapter only
            groups = tuple(_RowGroup(*bounds[i], tuple((j, index[(j, i)]) for j, ls in enumerate(live) if i in ls),
                                     float(self.segments[i].weights.spec.scale)) for i in segs)
            scales: tuple[torch.Tensor, ...] = ()
        else:
            # all segments at once over every row; the scale matrix zeroes each product outside its segment
            pairs = tuple((j, index[(j, i)]) for j, ls in enumerate(live) for i in ls)
            groups = (_RowGroup(0, n, pairs, 0),)
            scales = (self._scale_matrix(live, x.dtype, x.device)[row_offset:row_offset + n],)
        place = {i: p for p, i in enumerate(segs)}
        return _LoraAdd.apply(x, out, *base, _Layout(tuple(widths), groups), tuple(masters),
                              tuple(place[i] for i in owners), *scales, *lows, *(masters[first[i]] for i in segs))

    def _stacked(self, keys: tuple[str, ...], segs: list[int], dtype: torch.dtype
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs `segs`' adapters of modules `keys` in `dtype`: A's [G, Σ rank, in] (each run's modules side by
        side) and per module B's [G, width, rank]. Views of one [G, N] cast of the runs' packed buffers where
        the runs share a layout and the modules' A's are adjacent in it (no copy, a handful of views however
        many runs); else stacked copies of per-tensor casts."""
        runs = [self.segments[i].weights for i in segs]
        big = self._runs_buffer(segs, dtype)
        if big is not None:
            w0 = runs[0]
            base = w0.flat.storage_offset()
            a0 = w0.a[keys[0]].storage_offset() - base
            a_rows = sum(w0.a[k].shape[0] for k in keys)
            if all(w0.a[k].storage_offset() - base == a0 + sum(w0.a[q].numel() for q in keys[:j])
                   for j, k in enumerate(keys)):
                a3 = big[:, a0:a0 + a_rows * w0.a[keys[0]].shape[1]].view(len(segs), a_rows, -1)
                b3s = []
                for k in keys:
                    b0 = w0.b[k].storage_offset() - base
                    b3s.append(big[:, b0:b0 + w0.b[k].numel()].view(len(segs), *w0.b[k].shape))
                return a3, b3s
        a3 = torch.cat([self._cast(i, self.segments[i].weights.a[k], dtype) for i in segs for k in keys])
        b3s = [torch.stack([self._cast(i, self.segments[i].weights.b[k], dtype) for i in segs]) for k in keys]
        return a3.view(len(segs), -1, a3.shape[1]), b3s

    def _runs_buffer(self, segs: list[int], dtype: torch.dtype) -> torch.Tensor | None:
        """[G, N]: the packed buffers of runs `segs` (consecutive segments) cast to `dtype`, one row each, when
        every segment's run shares one layout (the same rank and modules); None otherwise. Cast once per
        micro-batch for all segments; the rows also serve `_cast`."""
        if dtype not in self._buffers:
            ws = [s.weights for s in self.segments]
            w0 = ws[0]
            big = None
            if all(w.flat is not None and w.flat.numel() == w0.flat.numel() and w.spec.rank == w0.spec.rank
                   and w.a.keys() == w0.a.keys() for w in ws):
                big = torch.empty(len(ws), w0.flat.numel(), dtype=dtype, device=w0.flat.device)
                for i, w in enumerate(ws):
                    low = self._low.get(i)
                    big[i].copy_(low if low is not None and low.dtype == dtype else w.flat.detach())
                    self._low[i] = big[i]
            self._buffers[dtype] = big
        big = self._buffers[dtype]
        if big is None or segs != list(range(segs[0], segs[-1] + 1)):
            return None
        return big[segs[0]:segs[-1] + 1]

    def _segment_plan(self, widths: list[int], live: list[tuple[int, ...]], segs: list[int],
                      bounds: dict[int, tuple[int, int]], n: int, device: torch.device) -> SegmentPlan | None:
        """The exact several-run form's plan, where it applies: every run adapts every module of the projection
        with one rank per module, and the runs' rows tile the call's rows in order."""
        if not SEGMENTED or any(ls != tuple(segs) for ls in live):
            return None
        edges = [0]
        for i in segs:
            if bounds[i][0] != edges[-1]:
                return None
            edges.append(bounds[i][1])
        if edges[-1] != n:
            return None
        ranks = {self.segments[i].weights.spec.rank for i in segs}
        if len(ranks) != 1:
            return None
        rank = ranks.pop()
        scales = [float(self.segments[i].weights.spec.scale) for i in segs]
        key = (tuple(edges), tuple(scales), device)
        cached = self._plans.get(key)
        if cached is None:
            scale: float | torch.Tensor = scales[0]
            if len(set(scales)) > 1:
                counts = np.diff(edges)
                scale = torch.from_numpy(np.repeat(np.asarray(scales, np.float32), counts)[:, None]).to(device)
            cached = self._plans[key] = (Segments.build(edges, device), scale)
        return SegmentPlan(tuple(widths), (rank,) * len(widths), *cached)

    def _scale_matrix(self, live: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[batch rows, Σ rank over (module, segment)]: each segment's scale on its own rows and rank columns.
        Built on the device from a per-row segment index and a per-column (segment, scale) pair, a few KB to
        copy: built on the host it was tens of MB of pageable copies a step at 8k rows (q/k/v of 8 rank-32 runs:
        8192 × 768 floats), which the H100's 8-run step waited for."""
        key = (tuple(live), dtype, device)
        full = self._scales.get(key)
        if full is None:
            if self._row_segment is None or self._row_segment.device != device:
                host = np.full(max(s.end for s in self.segments), -1, np.int32)
                for i, seg in enumerate(self.segments):
                    host[seg.start:seg.end] = i
                self._row_segment = torch.from_numpy(host).to(device, non_blocking=True)
            cols = [i for ls in live for i in ls]
            ranks = [self.segments[i].weights.spec.rank for i in cols]
            col_segment = torch.from_numpy(np.repeat(np.asarray(cols, np.int32), ranks)).to(device, non_blocking=True)
            col_scale = torch.from_numpy(np.repeat(np.asarray([self.segments[i].weights.spec.scale for i in cols],
                                                              np.float32), ranks)).to(device, non_blocking=True)
            full = torch.where(self._row_segment[:, None] == col_segment[None, :], col_scale[None, :],
                               0.0).to(dtype)
            self._scales[key] = full
        return full


@dataclass(frozen=True)
class _RowGroup:
    """Rows [start, end) of the call and the (module, master pair) products they take, module-major; `scale`
    is the adapter's scale, or the index of a [rows, Σ rank] scale matrix among the call's tensor inputs."""

    start: int
    end: int
    pairs: tuple[tuple[int, int], ...]
    scale: float | int


@dataclass(frozen=True)
class _Layout:
    widths: tuple[int, ...]  # output width of each module, side by side in `out`
    groups: tuple[_RowGroup, ...]

    @cached_property
    def modules(self) -> list[list[tuple[slice, list[int]]]]:
        """Per row group: (output columns, master pair indices) of each module it touches, in order."""
        col0 = [0]
        for w in self.widths:
            col0.append(col0[-1] + w)
        per_group = []
        for g in self.groups:
            out: list[tuple[slice, list[int]]] = []
            for j, mi in g.pairs:  # module-major: a module's pairs are consecutive
                if not out or out[-1][0].start != col0[j]:
                    out.append((slice(col0[j], col0[j + 1]), []))
                out[-1][1].append(mi)
            per_group.append(out)
        return per_group

    @cached_property
    def n_scales(self) -> int:
        """How many groups take a scale matrix (the call's first tensor inputs after the layout)."""
        return sum(1 for g in self.groups if not isinstance(g.scale, float))


class _LoraAdd(torch.autograd.Function):
    """out[rows of g] += Σ_modules expand(scale ⊙ shrink(x[rows of g])) for each row group g, in place; `out` is
    given, or (out None) the frozen base `F.linear(x, weight, bias)` computed here. After the layout: the
    masters (A, B per pair; they receive their gradients, set here) and each master's run's place among the
    `runs` inputs; then the groups' scale matrices, the masters in x's dtype (what the matmuls use), and one
    master per run as autograd's input, which says whether the run trains (as SegmentedLoraAdd's)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor | None, weight: torch.Tensor | None,
                bias: torch.Tensor | None, layout: _Layout, masters: tuple[torch.Tensor, ...],
                run_of: tuple[int, ...], *tensors: torch.Tensor) -> torch.Tensor:
        scales, lows = tensors[:layout.n_scales], tensors[layout.n_scales:layout.n_scales + len(masters)]
        if out is None:
            assert weight is not None and not weight.requires_grad, "the base weight must be frozen"
            out = F.linear(x, weight, bias)
        else:
            ctx.mark_dirty(out)
        saved: list[torch.Tensor] = []
        for g, modules in zip(layout.groups, layout.modules):
            rows = slice(g.start, g.end)
            a = _rows_of([lows[2 * mi] for _, mi in g.pairs])  # [Σ rank, in]
            xa = (x[rows] @ a.t()).mul_(g.scale if isinstance(g.scale, float) else scales[g.scale])
            saved += [xa, a]
            rc = 0
            for cols, mis in modules:
                b_list = [lows[2 * mi + 1] for mi in mis]
                b = torch.cat(b_list, dim=1) if len(b_list) > 1 else b_list[0]  # [width, rank]
                out[rows, cols].addmm_(xa[:, rc:rc + b.shape[1]], b.t())
                saved.append(b)
                rc += b.shape[1]
        # The masters are leaves: holding them (for their .grad) makes no reference cycle.
        ctx.layout, ctx.masters, ctx.run_of, ctx.given_out = layout, masters, run_of, weight is None
        ctx.save_for_backward(x, weight, *scales, *saved)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        layout: _Layout = ctx.layout
        masters = ctx.masters
        n_scales = layout.n_scales
        x, weight, *rest = ctx.saved_tensors
        scales, saved = rest[:n_scales], rest[n_scales:]
        need_x = ctx.needs_input_grad[0]
        trains = ctx.needs_input_grad[7 + n_scales + len(masters):]  # per run
        masters_need = tuple(trains[r] for r in ctx.run_of)
        dx = None
        if need_x and weight is not None:  # the base's input gradient; the adapters' add into it below
            dx = dy @ weight
        elif need_x:  # the groups' rows are disjoint: each writes its own rows of dx, the rest (if any) are zero
            covered = sum(g.end - g.start for g in layout.groups) == x.shape[0]
            dx = x.new_empty(x.shape) if covered else x.new_zeros(x.shape)
        dst, src = [], []
        at = 0
        for g, modules in zip(layout.groups, layout.modules):
            rows = slice(g.start, g.end)
            xa, a = saved[at], saved[at + 1]
            at += 2
            d_xa, g_b, rc = [], [], 0
            for cols, mis in modules:
                b = saved[at]
                at += 1
                dyj = dy[rows, cols]
                d_xa.append(dyj @ b)  # [rows, rank of module]
                g_b.append((mis, dyj.t() @ xa[:, rc:rc + b.shape[1]]))  # [width, rank of module]
                rc += b.shape[1]
            d_xa = (torch.cat(d_xa, dim=1) if len(d_xa) > 1 else d_xa[0]).mul_(
                g.scale if isinstance(g.scale, float) else scales[g.scale])
            if need_x and weight is not None:
                dx[rows].addmm_(d_xa, a)
            elif need_x:
                torch.mm(d_xa, a, out=dx[rows])
            if any(masters_need[2 * mi] or masters_need[2 * mi + 1] for _, mi in g.pairs):
                _collect(masters, masters_need, g, d_xa.t() @ x[rows], g_b, dst, src)
        if dst:
            torch._foreach_add_(dst, src)
        # A given `out` passes its gradient through unchanged; the masters' gradients were added above.
        return (dx, dy if ctx.given_out else None, None, None, None, None, None) + \
            (None,) * (n_scales + len(masters) + len(trains))


def _rows_of(parts: list[torch.Tensor]) -> torch.Tensor:
    """The [rows, in] tensors one under the other: a view when they already lie so in memory (a run's q/k/v or
    gate/up A's in its packed buffer, training_params.py), else a concatenation."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    at = first.storage_offset()
    for t in parts:
        if (t.storage_offset() != at or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return torch.cat(parts)
        at += t.numel()
    return first.as_strided((sum(t.shape[0] for t in parts), first.shape[1]), (first.shape[1], 1))


def _collect(masters: tuple[torch.Tensor, ...], need: tuple[bool, ...], g: _RowGroup, g_a: torch.Tensor,
             g_b: list[tuple[list[int], torch.Tensor]], dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Hand each master its slice of group g's stacked gradients: the slice itself as its first gradient (no
    copy), else queued for one multi-tensor add. Tensors that need no gradient (forward-only runs' detached
    views) are skipped. One cast to the masters' dtype per stacked gradient, not one per run and module."""
    dtype = masters[0].dtype
    g_a = g_a.to(dtype)
    row = 0
    for mis, gb in g_b:
        ranks = [masters[2 * mi].shape[0] for mi in mis]
        gb_parts = _per_run_columns(gb, ranks, dtype)
        for mi, r, gbi in zip(mis, ranks, gb_parts):
            for m, grad, ok in ((masters[2 * mi], g_a[row:row + r], need[2 * mi]),
                                (masters[2 * mi + 1], gbi, need[2 * mi + 1])):
                if ok:
                    give_grad(m, grad, dst, src)
            row += r


def _per_run_columns(gb: torch.Tensor, ranks: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
    """Split [width, Σ rank] into each run's [width, rank] in `dtype`, contiguous like the masters: the
    optimizer's multi-tensor kernels take their fast path only when every gradient is laid out as its parameter
    (one strided gradient sends a whole step to per-tensor kernels: ~1,800 extra launches at 8 runs on the 1B
    model, measured). Equal ranks: the cast and the regrouping are one copy for all runs."""
    if len(ranks) == 1:
        return [gb.to(dtype)]
    if len(set(ranks)) == 1:
        out = gb.new_empty((len(ranks), gb.shape[0], ranks[0]), dtype=dtype)
        out.copy_(gb.view(gb.shape[0], len(ranks), ranks[0]).transpose(0, 1))
        return list(out.unbind(0))
    return [part.to(dtype).contiguous() for part in gb.split(ranks, dim=1)]
