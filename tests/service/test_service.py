"""Service pieces without HTTP: the store, futures long-polling, tinker:// paths, checkpoint files, auth."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time

import pytest

from tinkerbell.service.auth import FIRST_KEY_FILE, Authenticator, create_key, hash_key, list_keys
from tinkerbell.service.checkpoints import CheckpointManager, parse_tinker_path, validate_name
from tinkerbell.service.errors import BadRequest, Gone, NotFound, Unauthorized
from tinkerbell.service.futures import FutureRegistry
from tinkerbell.service.store import Store, iso


def test_store_is_wal_and_keys_are_hashed(tmp_path):
    store = Store(tmp_path)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.add_key(hash_key("tml-secret"), "t1", "tml-secr…", "created")
    store.close()
    raw = sqlite3.connect(tmp_path / "tinkerbell.db").execute("SELECT * FROM api_keys").fetchall()
    assert "tml-secret" not in repr(raw)


def test_iso_has_an_explicit_offset():
    assert iso(0) == "1970-01-01T00:00:00Z"


def test_futures_long_poll_then_result_and_restart(tmp_path):
    store = Store(tmp_path)

    async def scenario():
        futures = FutureRegistry(store)
        rid, created, _ = futures.create("t", "optim_step", dedupe_key="train|m|1")
        assert created
        assert futures.create("t", "optim_step", dedupe_key="train|m|1")[0] == rid
        t0 = time.monotonic()
        assert await futures.wait(rid, "t", 0.1) is None
        assert time.monotonic() - t0 >= 0.1
        waiter = asyncio.ensure_future(futures.wait(rid, "t", 5))
        await asyncio.sleep(0.01)
        futures.complete_json(rid, {"metrics": {}})
        answer = await waiter
        assert answer.body == b'{"metrics": {}}' and not answer.failed
        with pytest.raises(Gone):
            await futures.wait(rid, "other-tenant", 0.1)
        with pytest.raises(Gone):
            await futures.wait("req-unknown", "t", 0.1)
        pending, _, _ = futures.create("t", "sample")
        return rid, pending

    done, pending = asyncio.run(scenario())
    store.close()

    store2 = Store(tmp_path)

    async def after_restart():
        futures = FutureRegistry(store2)
        assert futures.recover_after_restart() == 1
        a = await futures.wait(done, "t", 0.1)
        b = await futures.wait(pending, "t", 0.1)
        return a, b

    a, b = asyncio.run(after_restart())
    assert a.body == b'{"metrics": {}}'
    assert b.failed and b"restarted" in b.body and b'"server"' in b.body


def test_tinker_path_parsing():
    assert parse_tinker_path("tinker://s:train:0/weights/step1") == ("s:train:0", "weights", "step1")
    for bad in ("s3://x", "tinker://a/b", "tinker://a/weights/b/c", "tinker://a/other/b", "tinker://a/weights/..",
                "tinker://a/weights/"):
        with pytest.raises(BadRequest, match="path"):
            parse_tinker_path(bad)
    for bad in ("a/b", "..", "../x", "", ".x", "x y"):
        with pytest.raises(BadRequest):
            validate_name(bad)
    assert validate_name("step-0001_final.v2") == "step-0001_final.v2"


def test_checkpoint_commit_is_atomic_and_scoped(tmp_path):
    store = Store(tmp_path)
    cm = CheckpointManager(tmp_path, store)
    staging = cm.new_staging_dir()
    (staging / "adapter_model.safetensors").write_bytes(b"x" * 10)
    assert not cm.exists("r:train:0", "weights", "a")  # nothing visible before the rename
    row = cm.commit(staging, "r:train:0", "weights", "a", "alice", None, {"k": 1})
    assert row["size_bytes"] == 10 and not staging.exists()
    assert cm.get_owned("alice", "r:train:0", "weights", "a")["tinker_path"] == "tinker://r:train:0/weights/a"
    with pytest.raises(NotFound):
        cm.get_owned("bob", "r:train:0", "weights", "a")
    with pytest.raises(NotFound):
        cm.resolve("bob", "tinker://r:train:0/weights/a")
    cm.set_public("alice", "r:train:0", "weights", "a", True)
    assert cm.resolve("bob", "tinker://r:train:0/weights/a")[1].is_dir()
    store.set_checkpoint_expiry("r:train:0", "weights", "a", time.time() - 1)
    with pytest.raises(NotFound):
        cm.resolve("alice", "tinker://r:train:0/weights/a")
    assert not cm.dir_for("r:train:0", "weights", "a").exists()


def test_signed_urls_verify_and_expire(tmp_path):
    store = Store(tmp_path)
    cm = CheckpointManager(tmp_path, store)
    staging = cm.new_staging_dir()
    (staging / "adapter_config.json").write_text("{}")
    cm.commit(staging, "r:train:0", "external_weights", "e", "alice", None, None)
    out = cm.external_urls("alice", "r:train:0", "e", "http://h:1/")
    url = out["urls"]["adapter_config.json"]
    assert url.startswith("http://h:1/api/v1/download/") and out["expires"].endswith("Z")
    expires = int(url.split("expires=")[1].split("&")[0])
    sig = url.split("sig=")[1]
    assert cm.verify_download("r:train:0", "e", "adapter_config.json", expires, sig).read_text() == "{}"
    for args in (("r:train:0", "e", "adapter_config.json", expires, "0" * 64),
                 ("r:train:0", "e", "../../tinkerbell.db", expires, sig),
                 ("r:train:0", "e", "adapter_config.json", expires + 1, sig)):
        with pytest.raises(NotFound):
            cm.verify_download(*args)
    # The secret persists across restarts (0600), so URLs survive them.
    assert stat.S_IMODE(os.stat(tmp_path / "url-signing-secret").st_mode) == 0o600
    cm2 = CheckpointManager(tmp_path, store)
    assert cm2.verify_download("r:train:0", "e", "adapter_config.json", expires, sig).exists()


def test_authenticator(tmp_path):
    store = Store(tmp_path)
    auth = Authenticator(store, tmp_path, ["tml-one", "tml-two"], no_auth=False)
    assert not (tmp_path / FIRST_KEY_FILE).exists()
    t1 = auth.authenticate({"x-api-key": "tml-one"})
    assert t1 == auth.authenticate({"authorization": "Bearer tml-one"})
    assert t1 != auth.authenticate({"x-api-key": "tml-two"})
    with pytest.raises(Unauthorized):
        auth.authenticate({})
    with pytest.raises(Unauthorized):
        auth.authenticate({"x-api-key": "tml-three"})
    assert Authenticator(store, tmp_path, [], no_auth=True).authenticate({}) == "local"
    store.close()
    # `keys create --tenant` before the server starts: the configured key keeps that tenant.
    data = tmp_path / "d2"
    key = create_key(data, "team-x")
    store2 = Store(data)
    auth2 = Authenticator(store2, data, [key], no_auth=False)
    assert auth2.authenticate({"x-api-key": key}) == "team-x"
    assert [r["tenant"] for r in list_keys(data)] == ["team-x"]


def test_an_engine_capacity_failure_reaches_the_user_with_its_message():
    """Out of GPU memory is the server's failure (category server) but its message says what to do; other
    server-side exceptions stay a generic internal error."""
    from tinkerbell.engine.types import EngineCapacityError
    from tinkerbell.service.runs import failure_category, failure_message

    e = EngineCapacityError("the GPU ran out of memory ...; retry with fewer tokens per request")
    assert failure_category(e) == "server" and failure_message(e) == str(e)
    assert failure_message(RuntimeError("cuBLAS status 13")) == "internal error (RuntimeError); see the server log"
