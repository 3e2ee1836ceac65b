"""Percentiles, summaries and table cells: the arithmetic every figure in a report goes through."""

from __future__ import annotations

import math
import random

import pytest

from tinkerbell.bench.load import LoadResult, RequestRecord, fit, lognormal_lengths
from tinkerbell.bench.context import Target
from tinkerbell.bench.metrics import cdf, fmt, percentile, ratio, summarize


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 101):
        xs = [rng.random() * 100 for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_edges():
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, float("nan"), 3.0], 50) == 2.0  # NaN (a failed timing) is ignored
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_scales_and_counts():
    s = summarize([0.1, 0.2, 0.3, 0.4], scale=1000)
    assert s["p50"] == pytest.approx(250.0) and s["mean"] == pytest.approx(250.0) and s["n"] == 4
    assert math.isnan(summarize([])["p99"])


def test_ratio_cdf_fmt():
    assert ratio(10, 4) == 2.5 and ratio(1, 0) is None and ratio(None, 2) is None and ratio(float("nan"), 2) is None
    xs, ys = cdf([3, 1, 2])
    assert xs == [1, 2, 3] and ys == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert fmt(None) == "—" and fmt(float("nan")) == "—" and fmt(12345.6) == "12,346" and fmt(1.234, 2) == "1.23"
    assert fmt(7) == "7"


def test_load_summary_aggregates_records():
    recs = [RequestRecord("a", True, 10, output_tokens=5, ttft=0.1, e2e=0.5, itl=[0.1] * 4),
            RequestRecord("a", True, 10, output_tokens=5, ttft=0.3, e2e=0.7, itl=[0.1] * 4),
            RequestRecord("a", False, 10, error="boom")]
    s = LoadResult(recs, wall=2.0, concurrency=2).summary()
    assert s["requests"] == 2 and s["errors"] == 1
    assert s["output_tok_s"] == pytest.approx(5.0) and s["req_s"] == pytest.approx(1.0)
    assert s["ttft_ms_p50"] == pytest.approx(200.0) and s["itl_ms_p99"] == pytest.approx(100.0)
    assert s["tpot_ms_mean"] == pytest.approx(100.0)  # (0.5 - 0.1) / 4 and (0.7 - 0.3) / 4


def test_lengths_fit_the_context():
    t = Target("http://x", "tml-x", "m", {"max_context_length": 100, "vocab_size": 50})
    a, b = fit(t, 500, 30)
    assert a + b <= 99 and b == 30
    lens = lognormal_lengths(random.Random(1), 200, 24, 96)
    assert min(lens) >= 4 and max(lens) <= 96
