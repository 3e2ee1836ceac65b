"""Percentiles and latency summaries. Pure Python on purpose: the CLI must not import numpy or torch to
compare two results files."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

QUANTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default), NaN for
    no values. Linear, not nearest-rank: with the few samples of a quick run nearest-rank makes p90 == p99."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(v for v in values if not math.isnan(v))
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Iterable[float], scale: float = 1.0) -> dict[str, float]:
    """{p50, p90, p99, mean, n} of `values` × scale (e.g. 1000 for seconds -> ms)."""
    xs = [v * scale for v in values if not math.isnan(v)]
    out = {f"p{q}": percentile(xs, q) for q in QUANTILES}
    out["mean"] = sum(xs) / len(xs) if xs else float("nan")
    out["n"] = float(len(xs))
    return out


def ratio(ours: float | None, peer: float | None) -> float | None:
    if ours is None or peer is None or not peer or math.isnan(ours) or math.isnan(peer):
        return None
    return ours / peer


def cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted values and their cumulative fractions, for latency CDF plots."""
    xs = sorted(v for v in values if not math.isnan(v))
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]


def fmt(v: float | int | None, digits: int = 1) -> str:
    """A table cell: '—' for missing/NaN, thousands separators for large numbers."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"
