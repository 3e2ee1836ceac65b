"""The sharded model (gloo, 2 or 4 ranks on the CPU) computes the unsharded model's full logits on every path the
sampler takes: packed, paged KV cache, and the fast path with fused projections and gathered LoRA slots
(an adapter read from a checkpoint and cut on load, and one registered from in-memory pieces)."""

from __future__ import annotations

import pytest

from tests.engine.tp import ranks

TOL = 1e-5
CASES, IDS = ranks.CASES, ranks.CASE_IDS


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sharded_logits_equal_unsharded_on_every_rank(case, tp_run):
    run = tp_run(*case)
    ref = run.ref["sampler"]
    for rank_out in run.ranks:
        for key, want in ref.items():
            got = rank_out["sampler"][key]
            assert got.shape == want.shape, key
            assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item()), key


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapter_changes_the_sharded_logits(case, tp_run):
    """Guards the comparison above: the LoRA paths are not all-zero deltas."""
    out = tp_run(*case).ranks[0]["sampler"]
    assert (out["fast_lora"] - out["packed"]).abs().max() > 1e-2
