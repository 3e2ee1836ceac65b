"""tinker_api.md section 6: requests of one model run in seq_id order, whatever order they arrive in."""

from __future__ import annotations

import json

from tests.api.helpers import fb_body


def _dispatched(engine, model_id):
    return [name for name, arg in engine.calls
            if name in ("forward_backward", "optim_step", "save") and (arg == model_id or arg[0] == model_id)]


def test_out_of_order_chunks_wait_for_the_first(wire):
    m = wire.model()
    # The SDK posts chunks 2..n first and chunk 1 last; nothing may run before seq 1 is there.
    r3 = wire.optim(m, 3)
    r2 = wire.fb(m, 2)
    assert _dispatched(wire.engine, m) == []
    assert wire.retrieve(r2).status_code == 408
    r1 = wire.fb(m, 1)
    assert _dispatched(wire.engine, m) == ["forward_backward", "forward_backward", "optim_step"]
    for rid in (r1, r2):
        r = wire.result(rid)
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"
    assert "metrics" in wire.json_result(r3)


def test_a_gap_holds_later_requests(wire):
    m = wire.model()
    wire.result(wire.fb(m, 1))
    r3 = wire.optim(m, 3)
    assert _dispatched(wire.engine, m) == ["forward_backward"]
    assert wire.retrieve(r3).status_code == 408  # seq 2 is missing: seq 3 waits
    wire.optim(m, 2)
    assert _dispatched(wire.engine, m) == ["forward_backward", "optim_step", "optim_step"]
    wire.json_result(r3)


def test_duplicate_submission_returns_the_original_request_id(wire):
    m = wire.model()
    a = wire.fb(m, 1)
    b = wire.fb(m, 1)
    assert a == b
    assert wire.optim(m, 2) == wire.optim(m, 2)
    assert _dispatched(wire.engine, m) == ["forward_backward", "optim_step"]


def test_rejected_submissions_consume_their_seq_id(wire):
    m = wire.model()
    # A token id outside the vocabulary: the codec refuses it, the future fails, seq 1 is consumed.
    bad = wire.fb(m, 1, first_token=10_000)
    # An optim_step whose body does not validate: also consumed.
    r = wire.post("optim_step", {"model_id": m, "seq_id": 2, "adam_params": {"learning_rate": "fast"}})
    assert r.status_code == 200
    bad2 = r.json()["request_id"]
    good = wire.fb(m, 3)
    for rid, field in ((bad, "model_input"), (bad2, "learning_rate")):
        out = wire.json_result(rid)
        assert out["category"] == "user" and field in out["error"], out
    assert wire.result(good).headers["content-type"] == "application/x-protobuf"


def test_an_engine_failure_does_not_stop_the_model(wire):
    m = wire.model()
    bad = wire.fb(m, 1, loss_fn="no_such_loss")
    good = wire.optim(m, 2)
    assert "no_such_loss" in wire.json_result(bad)["error"]
    assert wire.json_result(good)["metrics"] == {"grad_norm:mean": 1.0}


def test_long_poll_answers_try_again_then_the_result(wire):
    m = wire.model()
    wire.engine.gate.clear()
    rid = wire.fb(m, 1)
    r = wire.retrieve(rid)
    assert r.status_code == 408
    assert r.json() == {"type": "try_again", "request_id": rid, "queue_state": "active"}
    assert int(r.headers["content-length"]) > 0
    wire.engine.gate.set()
    r = wire.result(rid)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"
    # Results stay retrievable after the first fetch (the SDK may re-poll after a lost response).
    assert wire.retrieve(rid).content == r.content


def test_unknown_or_foreign_request_ids_are_gone(wire):
    from tests.api.conftest import KEY_B
    from tests.api.helpers import Wire

    r = wire.retrieve("req-does-not-exist")
    assert r.status_code == 410 and "request_id" in r.json()["detail"]
    m = wire.model()
    rid = wire.fb(m, 1)
    other = Wire(wire.c, KEY_B)
    assert other.retrieve(rid).status_code == 410


def test_request_ids_are_unique_and_unguessable(wire):
    m = wire.model()
    ids = {wire.fb(m, i) for i in range(1, 30)}
    assert len(ids) == 29 and all(len(i) >= 20 for i in ids)


def test_metrics_history_is_recorded_per_step(wire):
    m = wire.model()
    wire.result(wire.fb(m, 1))
    wire.json_result(wire.optim(m, 2, lr=0.5))
    rows = wire.c.app.state.services.store.metrics_of_run(m)
    assert [(r["seq_id"], r["kind"]) for r in rows] == [(1, "forward_backward"), (2, "optim_step")]
    assert "loss:sum" in rows[0]["metrics"] and rows[1]["metrics"]["learning_rate"] == 0.5
    json.dumps(rows)


def test_forward_backward_body_without_ids_is_a_400(wire):
    r = wire.c.post("/api/v1/forward_backward", content=b"\xff\xff\xff",
                    headers={**wire.h, "Content-Type": "application/x-protobuf"})
    assert r.status_code == 400 and r.json()["detail"]
    r = wire.c.post("/api/v1/forward_backward", content=fb_body("nobody:train:0", 1),
                    headers={**wire.h, "Content-Type": "application/x-protobuf"})
    assert r.status_code == 404 and "nobody:train:0" in r.json()["detail"]
