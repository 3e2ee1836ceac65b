"""Error discipline (tinker_api.md 1.6/1.7): JSON bodies naming the field, explicit Content-Length, no
retryable status for permanent errors; and API-key auth."""

from __future__ import annotations

import os
import stat

import pytest

from tests.api.conftest import KEY_A, MODEL
from tests.api.helpers import Wire
from tinkerbell.service.auth import FIRST_KEY_FILE, create_key, list_keys


def _assert_error(r, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert int(r.headers["content-length"]) > 0 and "chunked" not in r.headers.get("transfer-encoding", "")
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail
    for w in words:
        assert w in detail, detail


def test_error_bodies_name_the_field(wire):
    sid = wire.session()
    _assert_error(wire.c.post("/api/v1/create_model", content=b"{oops", headers=wire.h), 400, "JSON")
    _assert_error(wire.post("create_model", {"session_id": sid, "model_seq_id": 0}), 400, "body.base_model")
    _assert_error(wire.post("create_model", {"session_id": sid, "model_seq_id": 0, "base_model": MODEL,
                                             "lora_config": {"rank": 100000}}), 400, "lora_config.rank", "64")
    _assert_error(wire.post("create_model", {"session_id": sid, "model_seq_id": 0, "base_model": "other/model",
                                             "lora_config": {"rank": 4}}), 404, "other/model", MODEL)
    _assert_error(wire.post("create_model", {"session_id": sid, "model_seq_id": 0, "base_model": MODEL,
                                             "lora_config": {"rank": 4},
                                             "optimizer_config": {"type": "dimuon", "version": 1}}), 400, "dimuon")
    _assert_error(wire.post("create_model", {"session_id": "nope", "model_seq_id": 0, "base_model": MODEL,
                                             "lora_config": {"rank": 4}}), 404, "session_id")
    _assert_error(wire.get("training_runs", params={"limit": "many"}), 422, "limit")
    _assert_error(wire.get("training_runs/nobody:train:0"), 404, "nobody:train:0")
    _assert_error(wire.get("no/such/route"), 404, "not an endpoint")
    _assert_error(wire.post("asample", {"sampling_session_id": "x:sample:0", "prompt": {"chunks": []}}), 404)
    _assert_error(wire.post("weights_info", {"tinker_path": "s3://bucket/x"}), 400, "tinker_path", "tinker://")
    _assert_error(wire.post("weights_info", {"tinker_path": "tinker://a/b"}), 400, "three parts")


def test_unknown_fields_and_type_are_ignored(wire):
    r = wire.post("create_session", {"tags": [], "user_metadata": {}, "sdk_version": "9.9", "type": "whatever",
                                     "brand_new_field": {"x": 1}})
    assert r.status_code == 200
    sid = r.json()["session_id"]
    r = wire.post("create_model", {"session_id": sid, "model_seq_id": 0, "base_model": MODEL,
                                   "lora_config": {"rank": 4, "future_knob": True}, "type": "create_model"})
    assert r.status_code == 200, r.text


def test_oversized_body_is_413(wire):
    r = wire.c.post("/api/v1/create_session", content=b"{}", headers={**wire.h, "Content-Length": str(1 << 40)})
    _assert_error(r, 413, "limit")


def test_unsupported_endpoints_say_so(wire):
    for method, path in (("POST", "auth/token"), ("POST", "retrieve_futures"), ("GET", "audit"),
                         ("POST", "create_custom_loss"), ("POST", "sessions/search")):
        _assert_error(wire.c.request(method, "/api/v1/" + path, json={}, headers=wire.h), 404, "not supported")


def test_bootstrap_answers(wire):
    assert wire.post("client/config", {"sdk_version": "0.38.0"}).json()["pjwt_auth_enabled"] is False
    assert wire.post("client/dynamic_config", {}).json() == {"sample_cancel_enabled": True}
    assert wire.post("telemetry", {"events": []}).json() == {"status": "accepted"}
    assert wire.get("healthz").json() == {"status": "ok"}
    caps = wire.get("get_server_capabilities").json()["supported_models"]
    assert caps[0]["model_name"] == MODEL and caps[0]["trainable"] and caps[0]["sampleable"]


def test_sessions_heartbeat_finish_and_listing(wire):
    sid = wire.session()
    assert wire.post("session_heartbeat", {"session_id": sid, "type": "session_heartbeat"}).status_code == 200
    _assert_error(wire.post("session_heartbeat", {"session_id": "unknown"}), 410)
    assert wire.post(f"sessions/{sid}/finish", {"reason": {"type": "success"}, "detail": None}).status_code == 200
    assert wire.post(f"sessions/{sid}/finish", {"reason": {"type": "errored"}}).status_code == 200  # idempotent
    _assert_error(wire.post("session_heartbeat", {"session_id": sid}), 410, "finished")
    assert sid in wire.get("sessions").json()["sessions"]
    assert wire.get(f"sessions/{sid}").json()["training_run_ids"] == []


def test_missing_or_bad_key_is_401_json(wire):
    _assert_error(wire.c.post("/api/v1/create_session", json={}), 401, "X-API-Key")
    _assert_error(wire.c.post("/api/v1/create_session", json={}, headers={"X-API-Key": "tml-nope"}), 401,
                  "invalid API key")
    r = wire.c.get("/api/v1/training_runs", headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 200
    assert wire.c.get("/healthz").status_code == 200  # ops endpoints need no key


def test_first_start_mints_a_key_with_mode_0600(app_factory, tmp_path):
    client = app_factory(api_keys=[])
    path = tmp_path / "data" / FIRST_KEY_FILE
    key = path.read_text().strip()
    assert key.startswith("tml-") and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Wire(client, key).get("training_runs").status_code == 200
    assert Wire(client, "tml-guess").get("training_runs").status_code == 401
    # A restart reuses the store: the same key works, no second key is minted.
    client2 = app_factory(api_keys=[])
    assert path.read_text().strip() == key
    assert Wire(client2, key).get("training_runs").status_code == 200
    assert len(list_keys(tmp_path / "data")) == 1


def test_keys_cli_helpers_share_a_tenant(app_factory, tmp_path):
    data = tmp_path / "data"
    k1 = create_key(data, "team")
    k2 = create_key(data, "team")
    k3 = create_key(data, None)
    assert all(k.startswith("tml-") for k in (k1, k2, k3))
    rows = list_keys(data)
    assert sum(r["tenant"] == "team" for r in rows) == 2 and all(k1 not in str(r) for r in rows)
    client = app_factory(api_keys=[])
    w1, w2, w3 = Wire(client, k1), Wire(client, k2), Wire(client, k3)
    m = w1.model()
    assert w2.get(f"training_runs/{m}").status_code == 200  # same tenant
    assert w3.get(f"training_runs/{m}").status_code == 404  # another tenant


def test_no_auth_accepts_any_key(app_factory):
    client = app_factory(api_keys=[], no_auth=True)
    assert Wire(client, "tml-anything").get("training_runs").status_code == 200
    assert client.get("/api/v1/training_runs").status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/health", "/stats", "/metrics"])
def test_ops_endpoints(wire, path):
    wire.model()
    r = wire.c.get(path)
    assert r.status_code == 200
    if path == "/stats":
        st = r.json()
        assert st["total_workers"] == 1 and st["healthy_workers"] == 1 and st["total_requests"] > 0
        assert "errors" in st and "engine" in st
    if path == "/metrics":
        assert "tinkerbell_requests_total" in r.text and "tinkerbell_tokens_sampled_total" in r.text
