"""LoRA in the training forward: each row of the packed batch adds its own run's adapter delta to a projection.

Two forms compute the same sums:

- the reference (`fused=False`, CPU default): per segment and module, `(x[s:e] @ A.T) @ B.T * scale` in the
  activations' dtype, autograd flowing through the casts to the fp32 masters;
- the fused form (`fused=True`, GPU default): one autograd node per projection (q/k/v together, gate/up
  together) for all runs at once. Its forward is one shrink GEMM over every (module, run) A stacked along the
  rank, a small [rows, Σ rank] scale (each run's scale on its own rows, zero elsewhere), and per module one
  expand GEMM that adds into the base projection's output in place (`addmm_`: no delta tensor, no separate
  add). Its backward is a handful of GEMMs and adds the masters' gradients itself, with one multi-tensor add
  per projection, instead of autograd copying each run's gradient slice out one kernel at a time (the second
  session counted ~900 such copies in an 8-run step on the 1B model).

Why not autograd through concatenated masters: the eager chain of casts, scales and adds runs an elementwise pass
over the full [rows, out] output per module (twice on the backward), which for gate/up alone is 2 × 128 MB a
layer at 8k tokens on the 1B model, and the per-run gradient slices need one copy each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tinkerbell.engine.lora import LoraSegment


@dataclass(frozen=True)
class _Layout:
    """Which (module, segment) pairs a fused call covers, module-major: `modules[j]` = (output width, indices
    of the live segments), in the order their A rows and B columns are stacked."""

    modules: tuple[tuple[int, tuple[int, ...]], ...]


class TrainLora:
    """`ctx.lora` for training: rows [start, end) use their segment's adapter."""

    def __init__(self, segments: list[LoraSegment], fused: bool = False):
        self.segments = [s for s in segments if s.weights is not None]
        self.fused = fused
        self._scales: dict[tuple, torch.Tensor] = {}

    def _live(self, key: str, row_offset: int, n: int) -> tuple[int, ...]:
        return tuple(i for i, seg in enumerate(self.segments) if key in seg.weights.a
                     and min(seg.end - row_offset, n) > max(seg.start - row_offset, 0))

    def apply(self, key: str, x: torch.Tensor, out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
        """`out` (the base linear's output for module `key`) plus each row's adapter delta."""
        return self.add((key,), x, out, row_offset)

    def add(self, keys: tuple[str, ...], x: torch.Tensor, out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
        """`out` [n, Σ widths] holds the base outputs of modules `keys` side by side (a fused q/k/v or gate/up
        projection); returns it plus each row's adapter deltas. The fused form updates `out` in place."""
        n = x.shape[0]
        live = [self._live(k, row_offset, n) for k in keys]
        if not any(live):
            return out
        widths = [self.segments[ls[0]].weights.b[k].shape[0] if ls else None for k, ls in zip(keys, live)]
        if None in widths:  # a module no segment adapts: its width from the split of `out`
            # (adapters target q/k/v and gate/up as groups, so at most one of a projection's modules is bare)
            assert widths.count(None) == 1, f"cannot split the output among {keys}: several have no adapter"
            known = sum(w for w in widths if w is not None)
            widths = [w if w is not None else out.shape[1] - known for w in widths]
        if not self.fused:
            pieces = out.split(widths, dim=-1) if len(keys) > 1 else (out,)
            done = [self._reference(k, x, p, row_offset, ls) for k, p, ls in zip(keys, pieces, live)]
            return done[0] if len(done) == 1 else torch.cat(done, dim=-1)
        return self._fused(keys, widths, live, x, out, row_offset)

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
               out: torch.Tensor, row_offset: int) -> torch.Tensor:
        layout = _Layout(tuple((w, ls) for w, ls in zip(widths, live)))
        masters: list[torch.Tensor] = []
        for k, ls in zip(keys, live):
            for i in ls:
                masters += [self.segments[i].weights.a[k], self.segments[i].weights.b[k]]
        scale = self._row_scale(layout, x.dtype, x.device, row_offset, x.shape[0])
        return _LoraAdd.apply(x, out, layout, scale, *masters)

    def _row_scale(self, layout: _Layout, dtype: torch.dtype, device: torch.device, row_offset: int,
                   n: int) -> torch.Tensor | float:
        """What the shrink's [n, Σ rank] output is multiplied by: the adapter's scale as a number when one
        segment covers all n rows, else a matrix with each segment's scale on its own rows and rank columns."""
        segs = {i for _, ls in layout.modules for i in ls}
        if len(segs) == 1:
            seg = self.segments[next(iter(segs))]
            if seg.start <= row_offset and seg.end >= row_offset + n:
                return float(seg.weights.spec.scale)
        key = (layout, dtype, device)
        full = self._scales.get(key)
        if full is None:
            rows = max(s.end for s in self.segments)
            cols = [i for _, ls in layout.modules for i in ls]
            host = np.zeros((rows, sum(self.segments[i].weights.spec.rank for i in cols)), np.float32)
            at = 0
            for i in cols:
                seg = self.segments[i]
                host[seg.start:seg.end, at:at + seg.weights.spec.rank] = seg.weights.spec.scale
                at += seg.weights.spec.rank
            full = torch.from_numpy(host).to(device=device, dtype=dtype)
            self._scales[key] = full
        return full[row_offset:row_offset + n]


class _LoraAdd(torch.autograd.Function):
    """out += Σ_modules expand(scale ⊙ shrink(x)), in place; masters = (A, B) per (module, live segment)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, layout: _Layout, scale: torch.Tensor | float,
                *masters: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        a_list = masters[0::2]
        a = (torch.cat(a_list) if len(a_list) > 1 else a_list[0]).to(dtype)  # [Σ rank, in]
        xa = (x @ a.t()).mul_(scale)  # [n, Σ rank], scaled per row
        bs, col, rcol, at = [], 0, 0, 0
        for width, segs in layout.modules:
            b_list = masters[2 * at + 1:2 * (at + len(segs)):2]
            at += len(segs)
            if not segs:
                col += width
                continue
            b = (torch.cat(b_list, dim=1) if len(b_list) > 1 else b_list[0]).to(dtype)  # [width, rank of module]
            out[:, col:col + width].addmm_(xa[:, rcol:rcol + b.shape[1]], b.t())
            bs.append(b)
            col += width
            rcol += b.shape[1]
        ctx.mark_dirty(out)
        # The masters are leaves: holding them (for their .grad) makes no reference cycle.
        ctx.layout, ctx.scale, ctx.masters = layout, scale, masters
        ctx.save_for_backward(x, xa, a, scale if isinstance(scale, torch.Tensor) else None, *bs)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, xa, a, scale_t, *bs = ctx.saved_tensors
        scale = ctx.scale if scale_t is None else scale_t
        layout: _Layout = ctx.layout
        masters_need = ctx.needs_input_grad[4:]
        d_xa, g_b, col, rcol, bi = [], [], 0, 0, 0
        for width, segs in layout.modules:
            if not segs:
                col += width
                continue
            b = bs[bi]
            bi += 1
            dyj = dy[:, col:col + width]
            d_xa.append(dyj @ b)  # [n, rank of module]
            g_b.append(dyj.t() @ xa[:, rcol:rcol + b.shape[1]])  # [width, rank of module]
            col += width
            rcol += b.shape[1]
        d_xa = (torch.cat(d_xa, dim=1) if len(d_xa) > 1 else d_xa[0]).mul_(scale)
        dx = d_xa @ a if ctx.needs_input_grad[0] else None
        if any(masters_need):
            _accumulate(ctx, layout, d_xa.t() @ x, g_b, masters_need)
        # `out` passes its gradient through unchanged; the masters' gradients were added by _accumulate.
        return (dx, dy, None, None) + (None,) * len(masters_need)


def _accumulate(ctx, layout: _Layout, g_a: torch.Tensor, g_b: list[torch.Tensor],
                masters_need: tuple[bool, ...]) -> None:
    """Add each master's slice of the stacked gradients to its `.grad` (first gradient: the slice itself, no
    copy; later ones: one multi-tensor add for all). Tensors that need no gradient (forward-only runs' detached
    views) are skipped."""
    masters = ctx.masters
    dtype = masters[0].dtype  # the fp32 masters: one cast per stacked gradient, not one per run and module
    g_a, g_b = g_a.to(dtype), [g.to(dtype) for g in g_b]
    dst, src = [], []
    row, mi = 0, 0
    for j, (width, segs) in enumerate(layout.modules):
        gbj = g_b.pop(0) if segs else None
        bcol = 0
        for _ in segs:
            a_m, b_m = masters[2 * mi], masters[2 * mi + 1]
            r = a_m.shape[0]
            for m, g, need in ((a_m, g_a[row:row + r], masters_need[2 * mi]),
                               (b_m, gbj[:, bcol:bcol + r], masters_need[2 * mi + 1])):
                if not need:
                    continue
                if m.grad is None:
                    m.grad = g
                else:
                    dst.append(m.grad)
                    src.append(g)
            row += r
            bcol += r
            mi += 1
    if dst:
        torch._foreach_add_(dst, src)
