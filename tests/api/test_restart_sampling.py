"""Restarts on the same data dir, and the sampling endpoints."""

from __future__ import annotations

from tests.api.conftest import MODEL
from tests.api.helpers import Wire


def test_restart_keeps_finished_futures_and_checkpoints(app_factory):
    w = Wire(app_factory())
    m = w.model()
    done = w.fb(m, 1)
    proto = w.result(done).content
    r = w.post("save_weights", {"model_id": m, "seq_id": 2, "path": "ckpt"})
    saved = r.json()["request_id"]
    path = w.json_result(saved)["path"]
    w.c.app.state.services.engine.gate.clear()
    pending = w.optim(m, 3)

    w2 = Wire(app_factory())  # a new process on the same data dir
    assert w2.result(done).content == proto
    assert w2.json_result(saved) == {"path": path}
    failed = w2.json_result(pending)
    assert failed["category"] == "server" and "restarted" in failed["error"]
    assert [c["tinker_path"] for c in w2.get(f"training_runs/{m}/checkpoints").json()["checkpoints"]] == [path]
    # The old run is known but not loaded; its next request fails with directions, in order.
    out = w2.json_result(w2.optim(m, 4))
    assert out["category"] == "user" and "create_training_client_from_state" in out["error"]
    # Resuming from the checkpoint works.
    sid = w2.session()
    r = w2.post("load_weights", {"session_id": sid, "model_seq_id": 0, "path": path, "optimizer": True})
    assert r.status_code == 200, r.text
    assert w2.json_result(r.json()["request_id"])["model_id"] == f"{sid}:train:0"
    info = w2.post("get_info", {"model_id": f"{sid}:train:0"}).json()
    assert info["lora_rank"] == 4 and info["model_data"]["model_name"] == MODEL
    assert w2.json_result(w2.optim(f"{sid}:train:0", 1))["metrics"]


def test_create_via_load_with_unknown_path_is_404(wire):
    sid = wire.session()
    r = wire.post("load_weights", {"session_id": sid, "model_seq_id": 0, "optimizer": False,
                                   "path": f"tinker://{sid}:train:9/weights/nothing"})
    assert r.status_code == 404 and "does not exist" in r.json()["detail"]


def test_legacy_load_state_on_an_existing_model(wire):
    m = wire.model()
    wire.json_result(wire.optim(m, 1))
    path = wire.json_result(wire.post("save_weights", {"model_id": m, "seq_id": 2, "path": "a"})
                            .json()["request_id"])["path"]
    r = wire.post("load_weights", {"model_id": m, "seq_id": 3, "path": path, "optimizer": True})
    assert wire.json_result(r.json()["request_id"]) == {"model_id": m, "path": path}
    assert wire.json_result(wire.optim(m, 4))["metrics"]


def _sampling_session(w: Wire, **kw) -> str:
    sid = w.session()
    r = w.post("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()["sampling_session_id"]


def _sample(w: Wire, sampler: str, seq_id: int, num_samples: int = 1, **kw):
    return w.post("asample", {"sampling_session_id": sampler, "seq_id": seq_id, "num_samples": num_samples,
                              "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                              "sampling_params": {"max_tokens": 2, "temperature": 1.0}, **kw})


def test_asample_handles_dedupe_and_validation(wire):
    sampler = _sampling_session(wire, base_model=MODEL)
    assert sampler.endswith(":sample:0")
    assert wire.get(f"samplers/{sampler}").json() == {"sampler_id": sampler, "base_model": MODEL,
                                                      "model_path": None}
    big = 7 * 10**17  # unpickled sampling clients use seq_ids around c * 1e9 (up to ~1e18)
    r = _sample(wire, sampler, big, num_samples=3)
    assert r.status_code == 200
    h = r.json()
    assert len(h["sample_sequence_ids"]) == 3 and len(set(h["sample_sequence_ids"])) == 3
    assert _sample(wire, sampler, big, num_samples=3).json()["request_id"] == h["request_id"]
    res = wire.result(h["request_id"])
    assert res.status_code == 200 and res.headers["content-type"] == "application/x-protobuf"
    r = wire.post("asample", {"sampling_session_id": sampler, "seq_id": 1,
                              "prompt": {"chunks": [{"type": "encoded_text", "tokens": [10**9]}]},
                              "sampling_params": {"max_tokens": 2}})
    assert r.status_code == 400 and "prompt" in r.json()["detail"]
    r = _sample(wire, sampler, 2, prompt_alt_tokens_k=2)
    assert r.status_code == 400 and "prompt_alt_tokens_k" in r.json()["detail"]


def test_sampling_session_validation(wire):
    sid = wire.session()
    r = wire.post("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0})
    assert r.status_code == 400 and "model_path" in r.json()["detail"]
    r = wire.post("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0,
                                              "model_path": "tinker://x:train:0/weights/a"})
    assert r.status_code == 404
    r = wire.post("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0,
                                              "model_path": "tinker://x:train:0/checkpoints/a"})
    assert r.status_code == 400 and "kind" in r.json()["detail"]
    assert wire.get("samplers/nope:sample:0").status_code == 404


def test_ephemeral_sampler_is_bound_to_its_point_in_order_and_survives_restart(app_factory, tmp_path):
    w = Wire(app_factory())
    m = w.model()
    sid = m.split(":")[0]
    w.optim(m, 1)
    r = w.post("save_weights_for_sampler", {"model_id": m, "seq_id": 2, "sampling_session_seq_id": 0,
                                            "kind": "snapshot"})
    w.optim(m, 3)  # later steps must not change what the sampler samples
    sampler = w.json_result(r.json()["request_id"])["sampling_session_id"]
    assert sampler == f"{sid}:sample:0"
    engine = w.c.app.state.services.engine
    assert engine.adapters[sampler] == ("memory", 1)
    assert [n for n, _ in engine.calls if n in ("publish", "save")][:2] == ["publish", "save"]
    assert w.get(f"samplers/{sampler}").json()["base_model"] == MODEL
    h = _sample(w, sampler, 0).json()
    assert w.result(h["request_id"]).status_code == 200

    w2 = Wire(app_factory())
    h = _sample(w2, sampler, 1).json()
    assert w2.result(h["request_id"]).status_code == 200
    assert w2.c.app.state.services.engine.adapters[sampler] == ("disk", 1)  # reloaded from its files


def test_a_model_whose_creation_failed_says_so(wire, tmp_path):
    sid = wire.session()
    m = wire.model(sid, 0)
    path = wire.json_result(wire.post("save_weights", {"model_id": m, "seq_id": 1, "path": "x"})
                            .json()["request_id"])["path"]
    folder = tmp_path / "data" / "checkpoints" / m / "weights" / "x"
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "optimizer_state.safetensors").unlink()  # a load with optimizer=true must now fail
    r = wire.post("load_weights", {"session_id": sid, "model_seq_id": 1, "path": path, "optimizer": True})
    failed = wire.json_result(r.json()["request_id"])
    assert failed["category"] == "user" and "optimizer state" in failed["error"]
    out = wire.json_result(wire.optim(f"{sid}:train:1", 1))
    assert "could not be created" in out["error"] and "optimizer state" in out["error"]
