"""Checkpoints: saving, listing, deleting, publishing, TTL, signed download URLs, age encryption, restarts."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlparse

import pyrage

from tests.api.conftest import KEY_B
from tests.api.helpers import Wire


def _save(wire: Wire, m: str, seq: int, name: str, endpoint: str = "save_weights", **extra) -> dict:
    r = wire.post(endpoint, {"model_id": m, "seq_id": seq, "path": name, **extra})
    assert r.status_code == 200, r.text
    return wire.json_result(r.json()["request_id"])


def test_save_list_delete(wire, tmp_path):
    m = wire.model()
    a = _save(wire, m, 1, "first", ttl_seconds=7200, user_metadata={"k": "v"})
    assert a["path"] == f"tinker://{m}/weights/first"
    b = _save(wire, m, 2, "s1", "save_weights_for_sampler")
    assert b["path"] == f"tinker://{m}/sampler_weights/s1"
    folder = tmp_path / "data" / "checkpoints" / m / "weights" / "first"
    assert (folder / "adapter_model.safetensors").exists() and (folder / "optimizer_state.safetensors").exists()
    assert not (tmp_path / "data" / "checkpoints" / m / "sampler_weights" / "s1" / "optimizer_state.safetensors").exists()

    items = wire.get(f"training_runs/{m}/checkpoints").json()["checkpoints"]
    assert [c["checkpoint_id"] for c in items] == ["sampler_weights/s1", "weights/first"]  # newest first
    first = items[1]
    assert first["checkpoint_type"] == "training" and first["user_metadata"] == {"k": "v"}
    assert first["time"].endswith("Z") and first["expires_at"].endswith("Z") and first["size_bytes"] > 0
    mine = wire.get("checkpoints", params={"limit": 1}).json()
    assert mine["cursor"] == {"offset": 0, "limit": 1, "total_count": 2} and len(mine["checkpoints"]) == 1

    run = wire.get(f"training_runs/{m}").json()
    assert run["last_checkpoint"]["checkpoint_id"] == "weights/first"
    assert run["last_sampler_checkpoint"]["checkpoint_id"] == "sampler_weights/s1"
    assert run["last_request_time"].endswith("Z")

    assert wire.c.delete(f"/api/v1/training_runs/{m}/checkpoints/weights/first", headers=wire.h).status_code == 200
    assert not folder.exists()
    r = wire.c.delete(f"/api/v1/training_runs/{m}/checkpoints/weights/first", headers=wire.h)
    assert r.status_code == 404 and "weights/first" in r.json()["detail"]
    r = wire.c.delete(f"/api/v1/training_runs/{m}/checkpoints/bogus/first", headers=wire.h)
    assert r.status_code == 400 and "kind" in r.json()["detail"]


def test_overwrite_rules(wire):
    m = wire.model()
    _save(wire, m, 1, "x")
    r = wire.post("save_weights", {"model_id": m, "seq_id": 2, "path": "x"})
    out = wire.json_result(r.json()["request_id"])
    assert out["category"] == "user" and "already exists" in out["error"] and "overwrite" in out["error"]
    assert _save(wire, m, 3, "x", overwrite=True)["path"].endswith("/weights/x")
    for seq, bad in ((4, "../escape"), (5, "a/b"), (6, ".hidden"), (7, "")):
        r = wire.post("save_weights", {"model_id": m, "seq_id": seq, "path": bad})
        out = wire.json_result(r.json()["request_id"])
        assert out["category"] == "user" and "path" in out["error"], out


def test_ttl_expires_lazily_and_can_be_changed(wire):
    m = wire.model()
    _save(wire, m, 1, "short", ttl_seconds=3600)
    _save(wire, m, 2, "keep", ttl_seconds=3600)
    r = wire.c.put(f"/api/v1/training_runs/{m}/checkpoints/weights/keep/ttl", json={"ttl_seconds": None},
                   headers=wire.h)
    assert r.status_code == 200
    store = wire.c.app.state.services.store
    store.set_checkpoint_expiry(m, "weights", "short", time.time() - 1)  # as if the hour had passed
    ids = [c["checkpoint_id"] for c in wire.get(f"training_runs/{m}/checkpoints").json()["checkpoints"]]
    assert ids == ["weights/keep"]
    assert wire.get(f"training_runs/{m}/checkpoints").json()["checkpoints"][0]["expires_at"] is None
    r = wire.c.put(f"/api/v1/training_runs/{m}/checkpoints/weights/keep/ttl", json={"ttl_seconds": "soon"},
                   headers=wire.h)
    assert r.status_code == 400 and "ttl_seconds" in r.json()["detail"]


def test_publish_lets_other_tenants_read(wire):
    m = wire.model()
    path = _save(wire, m, 1, "pub", "save_weights_for_sampler")["path"]
    bob = Wire(wire.c, KEY_B)
    sid = bob.session()
    body = {"session_id": sid, "sampling_session_seq_id": 0, "model_path": path}
    r = bob.post("create_sampling_session", body)
    assert r.status_code == 404
    assert wire.c.post(f"/api/v1/training_runs/{m}/checkpoints/sampler_weights/pub/publish",
                       headers=wire.h).status_code == 200
    assert bob.post("create_sampling_session", body).status_code == 200
    assert wire.post("weights_info", {"tinker_path": path}).json()["lora_rank"] == 4
    assert bob.post("weights_info", {"tinker_path": path}).status_code == 200
    # Bob still cannot change it.
    assert bob.c.delete(f"/api/v1/training_runs/{m}/checkpoints/sampler_weights/pub",
                        headers=bob.h).status_code == 404
    assert wire.c.delete(f"/api/v1/training_runs/{m}/checkpoints/sampler_weights/pub/publish",
                         headers=wire.h).status_code == 200
    assert bob.post("create_sampling_session", {**body, "sampling_session_seq_id": 1}).status_code == 404


def test_external_weights_signed_urls(wire):
    m = wire.model()
    out = _save(wire, m, 1, "export", "save_weights_external")
    assert out["path"] == f"tinker://{m}/external_weights/export" and out["size_bytes"] > 0
    r = wire.get(f"training_runs/{m}/checkpoints/external_weights/export/external_weights_urls")
    assert r.status_code == 200
    body = r.json()
    assert set(body["urls"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert body["expires"].endswith("Z")
    url = urlparse(body["urls"]["adapter_model.safetensors"])
    got = wire.c.get(f"{url.path}?{url.query}")  # no API key
    assert got.status_code == 200 and got.content.startswith(b"weights-")
    tampered = url.query.replace("sig=", "sig=0")
    assert wire.c.get(f"{url.path}?{tampered}").status_code == 404
    expired = "expires=1&" + url.query.split("&", 1)[1]
    r = wire.c.get(f"{url.path}?{expired}")
    assert r.status_code == 404 and "expired" in r.json()["detail"]
    assert Wire(wire.c, KEY_B).get(
        f"training_runs/{m}/checkpoints/external_weights/export/external_weights_urls").status_code == 404


def test_external_weights_age_encryption(wire, tmp_path):
    ident = pyrage.x25519.Identity.generate()
    m = wire.model()
    _save(wire, m, 1, "enc", "save_weights_external", age_encryption_recipients=[str(ident.to_public())])
    urls = wire.get(f"training_runs/{m}/checkpoints/external_weights/enc/external_weights_urls").json()["urls"]
    assert set(urls) == {"adapter_config.json.age", "adapter_model.safetensors.age"}
    url = urlparse(urls["adapter_model.safetensors.age"])
    assert pyrage.decrypt(wire.c.get(f"{url.path}?{url.query}").content, [ident]).startswith(b"weights-")
    r = wire.post("save_weights_external", {"model_id": m, "seq_id": 2, "path": "bad",
                                            "age_encryption_recipients": ["not-a-key"]})
    out = wire.json_result(r.json()["request_id"])
    assert out["category"] == "user" and "age_encryption_recipients[0]" in out["error"]


def test_copy_weights(wire):
    m = wire.model()
    path = _save(wire, m, 1, "orig")["path"]
    r = wire.post("copy_weights", {"source_path": path})
    assert r.status_code == 200, r.text
    copied = r.json()["tinker_path"]
    assert copied != path and copied.endswith("/weights/orig")
    assert wire.post("weights_info", {"tinker_path": copied}).json()["lora_rank"] == 4


def test_torn_writes_leave_nothing_visible(app_factory, tmp_path):
    w = Wire(app_factory())
    m = w.model()
    staging = tmp_path / "data" / "checkpoints" / ".staging" / "half-written"
    staging.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(b"torn")
    w2 = Wire(app_factory())
    assert not staging.exists()
    assert w2.get(f"training_runs/{m}/checkpoints").json()["checkpoints"] == []
