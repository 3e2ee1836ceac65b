"""Serving a LLaDA checkpoint: the engine behind the app, `/generation/algorithms`, `/batch/stats`, the engine's
per-block callback that streaming rides on, and an unknown algorithm refused as a user error (never a silent
fallback)."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tinkerbell.api import diffusion as diffusion_api
from tinkerbell.engine.types import EngineUserError, SampleJob


class _Services:
    def __init__(self, engine):
        self.engine = engine


@pytest.fixture(scope="module")
def engine(tiny_llada_dir):
    from tinkerbell.engine.engine import Engine, EngineConfig

    eng = Engine(EngineConfig(model=str(tiny_llada_dir), device="cpu", algorithm="prefix_cache", batch_size=8))
    yield eng
    eng.shutdown()


def test_algorithm_listing_and_batch_stats(engine):
    app = FastAPI()
    app.state.services = _Services(engine)
    diffusion_api.install(app)
    client = TestClient(app)
    listing = client.get("/generation/algorithms").json()
    assert listing["default"] == "prefix_cache"
    assert {a["name"] for a in listing["algorithms"]} == {"basic", "prefix_cache", "dual_cache"}
    assert sorted(next(a for a in listing["algorithms"] if a["name"] == "basic")["aliases"]) == ["no_cache", "simple"]
    futs = [engine.sample(SampleJob(prompt=[10 + i, 20], max_tokens=8, temperature=0.0, steps=4, block_length=4))
            for i in range(4)]
    for f in futs:
        f.result(timeout=60)
    stats = client.get("/batch/stats").json()
    assert stats["max_batch_size"] == 8 and stats["batches_run"] >= 1 and stats["pending_requests"] == 0
    assert sum(stats["batch_size_histogram"].values()) == stats["batches_run"]


def test_on_block_reports_each_final_block(engine):
    blocks: list[tuple[int, list[int], bool]] = []  # appended on the engine thread
    job = SampleJob(prompt=[30, 31, 32], max_tokens=12, temperature=0.0, steps=6, block_length=4,
                    stop_at_eos=False, num_samples=2, on_block=lambda i, toks, done: blocks.append((i, toks, done)))
    final = engine.sample(job).result(timeout=60)
    for i, seq in enumerate(final.sequences):
        mine = [b for b in blocks if b[0] == i]
        assert [t for _, toks, _ in mine for t in toks] == seq.tokens
        assert [done for _, _, done in mine] == [False, False, True]


def test_unknown_algorithm_is_a_user_error(engine):
    fut = engine.sample(SampleJob(prompt=[10], max_tokens=4, generation_algorithm="turbo"))
    with pytest.raises(EngineUserError, match="unknown algorithm 'turbo'"):
        fut.result(timeout=60)
