"""Routing identifiers and the policy, without any process."""

from __future__ import annotations

import time

from tinker.proto import tinker_public_pb2 as pb

from tinkerbell.router import ids
from tinkerbell.router.pool import Pool
from tinkerbell.router.routes import plan


def test_request_ids_round_trip_and_foreign_ids_are_left_alone():
    t = ids.untag(ids.tag(3, ids.TRAIN, "req-abc_-1", "s1:train:0"))
    assert t == ids.Tagged(3, "t", "req-abc_-1", "s1:train:0")
    assert ids.untag(ids.tag(0, ids.SAMPLE, "req-x")) == ids.Tagged(0, "s", "req-x", None)
    for foreign in ("req-abc", "r~t", "x1~t~req", ""):
        assert ids.untag(foreign) is None
    assert ids.session_of("abc:train:2") == "abc" and ids.session_of("abc:sample:0") == "abc"
    assert ids.session_of("my-adapter") is None
    assert ids.run_of_path("tinker://abc:train:1/weights/s1") == "abc:train:1"
    assert ids.run_of_path("/local/path") is None


def test_peek_model_id_reads_only_the_head_of_a_forward_backward_body():
    req = pb.ForwardBackwardRequest(model_id="sess:train:4", seq_id=7)
    assert ids.peek_model_id(req.SerializeToString()) == "sess:train:4"
    assert ids.peek_model_id(b"\xff\xff") is None
    import zstandard

    assert ids.peek_model_id(zstandard.ZstdCompressor().compress(req.SerializeToString()), "zstd") == "sess:train:4"


def _pool(n: int = 3) -> Pool:
    pool = Pool([f"http://r{i}" for i in range(n)])
    for r in pool.replicas:
        r.healthy = True
    return pool


def test_least_outstanding_work_healthy_first_affinity_with_slack():
    pool = _pool()
    a, b, c = pool.replicas
    a.in_flight, b.in_flight, c.in_flight = 5, 1, 3
    assert [r.index for r in pool.ranked()] == [1, 2, 0]
    b.healthy = False
    assert [r.index for r in pool.ranked()] == [2, 0, 1]  # a down replica is the last resort, not excluded
    b.healthy = True
    assert pool.ranked(prefer=[2])[0] is c  # resident adapter, 2 busier than the least busy: within the slack
    c.in_flight = 20
    assert pool.ranked(prefer=[2])[0] is b  # too busy: the adapter is loaded elsewhere instead
    a.pending["x"] = 0.0
    assert a.outstanding == 6


def test_sessions_spread_when_idle():
    pool = _pool(2)
    first = pool.ranked(spread_sessions=True)[0]
    pool.note_session("s1", first)
    assert pool.ranked(spread_sessions=True)[0] is not first


def test_plans_keep_state_on_its_replica():
    pool = _pool()
    pool.note_session("S", pool.replicas[2])
    p = plan(pool, "POST", "/api/v1/create_model", {"session_id": "S", "model_seq_id": 0}, b"", None)
    assert p.candidates[0].index == 2 and p.model_id == "S:train:0" and not p.retry_ambiguous
    pool.runs.put("S:train:0", 1)
    body = pb.ForwardBackwardRequest(model_id="S:train:0", seq_id=1).SerializeToString()
    p = plan(pool, "POST", "/api/v1/forward_backward", None, body, None)
    assert p.pinned and [r.index for r in p.candidates] == [1]
    pool.replicas[1].healthy = False  # pinned anyway: only that replica holds the run
    p = plan(pool, "POST", "/api/v1/optim_step", {"model_id": "S:train:0", "seq_id": 2}, b"", None)
    assert p.pinned and [r.index for r in p.candidates] == [1]
    # An ephemeral sampler follows its session; a poll follows its tag.
    p = plan(pool, "POST", "/api/v1/asample", {"sampling_session_id": "S:sample:3", "seq_id": 0}, b"", None)
    assert p.candidates[0].index == 2 and p.strip_seq_on_failover and len(p.candidates) == 3
    p = plan(pool, "POST", "/api/v1/retrieve_future", {"request_id": ids.tag(1, "t", "req-q", "S:train:0")}, b"", None)
    assert p.pinned and p.untagged_request_id == "req-q" and p.model_id == "S:train:0" and p.long_poll
    # A sampler for a checkpoint prefers the run's replica (it may hold the weights), if that one is up.
    p = plan(pool, "POST", "/api/v1/create_sampling_session",
             {"session_id": "T", "model_path": "tinker://S:train:0/sampler_weights/a"}, b"", None)
    assert p.candidates[0].index != 1 and p.learn == "sampler"
    pool.replicas[1].healthy = True
    p = plan(pool, "POST", "/api/v1/create_sampling_session",
             {"session_id": "T", "model_path": "tinker://S:train:0/sampler_weights/a"}, b"", None)
    assert p.candidates[0].index == 1


def test_openai_adapter_affinity_and_broadcast():
    pool = _pool()
    pool.base_models.add("base")
    pool.replicas[2].adapters = {"tinker://S:train:0/sampler_weights/a"}
    p = plan(pool, "POST", "/v1/chat/completions", {"model": "tinker://S:train:0/sampler_weights/a"}, b"", None)
    assert p.candidates[0].index == 2 and p.adapter
    pool.replicas[0].in_flight = 1
    p = plan(pool, "POST", "/v1/completions", {"model": "base"}, b"", None)
    assert p.candidates[0].index == 1 and p.adapter is None
    assert plan(pool, "POST", "/v1/load_lora_adapter", {"lora_name": "x"}, b"", None).broadcast


def test_a_restarted_replica_is_noticed_from_its_uptime_and_its_old_futures_stop_counting():
    pool = _pool(2)
    a = pool.replicas[0]
    assert not pool.apply_stats(a, {"uptime_seconds": 100.0})
    a.pending["r0~t~req-old"] = time.time()
    assert not pool.apply_stats(a, {"uptime_seconds": 101.0})  # same process, a second later
    assert a.outstanding == 1
    assert pool.apply_stats(a, {"uptime_seconds": 0.5})  # a new process
    assert a.outstanding == 0 and a.restarts == 1 and a.view()["restarts"] == 1
