"""Futures on a store shared by several replicas (`serve --dp N`): each future records its owner, a restarting
replica fails only its own pending futures, and a poll reaching another replica waits for the owner's result.
Every test uses a real SQLite file, one `Store` per simulated process, as the replicas do."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest

from tinkerbell.service.futures import REPLICA_ID_ENV, FutureRegistry, fail_left_over
from tinkerbell.service.store import DB_FILE, Store

RUN0 = "s0:train:0"
RUN1 = "s1:train:0"


def _state(store: Store, rid: str) -> str:
    row = store.get_future(rid)
    assert row is not None
    return row["state"]


def _error(store: Store, rid: str) -> dict:
    row = store.get_future(rid)
    assert row is not None and row["state"] == "failed"
    return json.loads(row["result"])


def test_restarting_replica_fails_only_its_own_pending_futures(tmp_path):
    s0, s1 = Store(tmp_path), Store(tmp_path)
    r0, r1 = FutureRegistry(s0, owner="replica-0"), FutureRegistry(s1, owner="replica-1")
    done0, _, _ = r0.create("t", "forward_backward", dedupe_key=f"train|{RUN0}|1")
    r0.complete_json(done0, {"loss": 1.0})
    pending0, _, _ = r0.create("t", "optim_step", dedupe_key=f"train|{RUN0}|2")
    pending1, _, _ = r1.create("t", "optim_step", dedupe_key=f"train|{RUN1}|3")
    s1.close()  # replica 1 dies with a training request running

    restarted = FutureRegistry(Store(tmp_path), owner="replica-1")
    assert restarted.recover_after_restart() == 1
    assert _state(s0, pending0) == "pending" and _state(s0, done0) == "done"
    err = _error(s0, pending1)
    assert err["category"] == "server"
    assert RUN1 in err["error"] and "replica-1 restarted" in err["error"]
    assert f"create_training_client_from_state_with_optimizer('tinker://{RUN1}/weights/<name>')" in err["error"]


def test_live_replica_still_finishes_its_future_after_another_restarts(tmp_path):
    s0 = Store(tmp_path)
    r0 = FutureRegistry(s0, owner="replica-0")

    async def scenario():
        rid, _, _ = r0.create("t", "optim_step", dedupe_key=f"train|{RUN0}|1")
        waiter = asyncio.ensure_future(r0.wait(rid, "t", 5))
        await asyncio.sleep(0.01)
        FutureRegistry(Store(tmp_path), owner="replica-1").recover_after_restart()
        r0.complete_json(rid, {"metrics": {}})
        return await waiter

    answer = asyncio.run(scenario())
    assert not answer.failed and json.loads(answer.body) == {"metrics": {}}


def test_standalone_server_fails_every_pending_future(tmp_path, monkeypatch):
    monkeypatch.delenv(REPLICA_ID_ENV, raising=False)
    s = Store(tmp_path)
    rid_a, _, _ = FutureRegistry(s, owner="replica-0").create("t", "sample")
    rid_b, _, _ = FutureRegistry(s, owner="replica-1").create("t", "sample")
    standalone = FutureRegistry(Store(tmp_path))
    assert standalone.owner is None
    assert standalone.recover_after_restart() == 2
    assert "replica-0 restarted" in _error(s, rid_a)["error"]
    assert "replica-1 restarted" in _error(s, rid_b)["error"]


def test_owner_comes_from_the_replica_id_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(REPLICA_ID_ENV, "replica-7")
    s = Store(tmp_path)
    rid, _, _ = FutureRegistry(s).create("t", "sample")
    assert s.get_future(rid)["owner"] == "replica-7"


def test_supervisor_start_fails_every_owners_pending_futures(tmp_path):
    s = Store(tmp_path)
    rid_a, _, _ = FutureRegistry(s, owner="replica-0").create("t", "create_model", dedupe_key=f"create|{RUN0}")
    rid_b, _, _ = FutureRegistry(s, owner="replica-5").create("t", "sample")
    assert fail_left_over(s, None, everyone=True) == 2
    assert RUN0 in _error(s, rid_a)["error"] and "create the training client again" in _error(s, rid_a)["error"]
    assert _state(s, rid_b) == "failed"


def test_old_database_gains_the_owner_column_and_its_pending_futures_are_failed(tmp_path):
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.executescript("""
        CREATE TABLE futures (request_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL,
            state TEXT NOT NULL, result BLOB, content_type TEXT, created REAL NOT NULL, finished REAL,
            dedupe_key TEXT, extra TEXT);
        INSERT INTO futures VALUES ('req-old-pending', 't', 'forward_backward', 'pending', NULL, NULL, 1.0, NULL,
            't|train|s9:train:0|4', NULL);
        INSERT INTO futures VALUES ('req-old-done', 't', 'sample', 'done', X'7b7d', 'application/json', 1.0,
            9e12, NULL, NULL);
    """)
    db.close()
    s = Store(tmp_path)
    assert s.get_future("req-old-done")["owner"] is None
    assert FutureRegistry(s, owner="replica-0").recover_after_restart() == 1
    assert "s9:train:0" in _error(s, "req-old-pending")["error"]
    assert _state(s, "req-old-done") == "done"
    Store(tmp_path).close()  # a second open finds the column already there


def test_poll_on_another_replica_waits_for_the_owners_result(tmp_path):
    s0, s1 = Store(tmp_path), Store(tmp_path)
    r0, r1 = FutureRegistry(s0, owner="replica-0"), FutureRegistry(s1, owner="replica-1")

    async def scenario():
        rid, _, _ = r0.create("t", "sample")
        assert await r1.wait(rid, "t", 0.3) is None  # still running on replica 0: not failed by a stray poll
        assert _state(s0, rid) == "pending"
        waiter = asyncio.ensure_future(r1.wait(rid, "t", 5))
        await asyncio.sleep(0.1)
        r0.complete_json(rid, {"ok": True})
        return await waiter

    answer = asyncio.run(scenario())
    assert not answer.failed and json.loads(answer.body) == {"ok": True}


def test_poll_on_restarted_replica_fails_what_its_predecessor_left(tmp_path):
    s_old = Store(tmp_path)
    rid, _, _ = FutureRegistry(s_old, owner="replica-1").create("t", "optim_step", dedupe_key=f"train|{RUN1}|2")
    # A replica-1 that has not run recovery yet (or raced it): a poll still answers instead of hanging.
    fresh = FutureRegistry(Store(tmp_path), owner="replica-1")
    answer = asyncio.run(fresh.wait(rid, "t", 5))
    assert answer is not None and answer.failed and RUN1.encode() in answer.body


@pytest.mark.parametrize("key,expected", [
    (f"t|train|{RUN0}|3", (RUN0, "train")),
    (f"t|create|{RUN0}", (RUN0, "create")),
    ("t|sample|base|4", (None, "other")),
    (None, (None, "other")),
])
def test_run_of_reads_the_dedupe_key(key, expected):
    from tinkerbell.service.futures import run_of

    assert run_of({"tenant": "t", "dedupe_key": key}) == expected
