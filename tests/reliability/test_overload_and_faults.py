"""Overload, cancellation, disk-full and torn-write behaviour over the FakeEngine app (fast, deterministic)."""

from __future__ import annotations

import errno
import logging
import shutil
from concurrent.futures import Future
from pathlib import Path

import pytest

from tests.api.conftest import MODEL
from tests.api.helpers import Wire
from tests.reliability.conftest import assert_clean_answer
from tests.service.fakes import FakeEngine


def _sampler(w: Wire) -> str:
    r = w.post("create_sampling_session", {"session_id": w.session(), "sampling_session_seq_id": 0,
                                           "base_model": MODEL})
    return r.json()["sampling_session_id"]


def _sample(w: Wire, sampler: str, seq_id: int):
    return w.post("asample", {"sampling_session_id": sampler, "seq_id": seq_id, "num_samples": 1,
                              "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                              "sampling_params": {"max_tokens": 2}})


def test_over_the_queue_limit_is_429_with_retry_after_never_dropped(app_factory):
    client = app_factory(max_queued_requests=2)
    w, engine = Wire(client), client.app.state.services.engine
    sampler = _sampler(w)
    engine.gate.clear()  # hold the engine: requests stay unfinished
    first = [_sample(w, sampler, i) for i in range(2)]
    assert all(r.status_code == 200 for r in first)
    refused = _sample(w, sampler, 2)
    assert_clean_answer(refused)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "--max-queued-requests 2" in refused.json()["detail"]
    assert "x-should-retry" not in refused.headers  # the SDK must back off and resubmit, not give up
    # A retry of an already accepted request is answered from the dedupe table, not refused.
    again = _sample(w, sampler, 0)
    assert again.status_code == 200 and again.json()["request_id"] == first[0].json()["request_id"]
    # A request that can never succeed gets its 4xx even under overload.
    bad = w.post("asample", {"sampling_session_id": sampler, "prompt": {"chunks": []}})
    assert bad.status_code == 400
    engine.gate.set()
    for r in first:
        assert w.result(r.json()["request_id"]).headers["content-type"] == "application/x-protobuf"
    assert _sample(w, sampler, 3).status_code == 200  # room again
    assert client.app.state.services.samplers.refused == 1


def test_cancel_future_stops_an_unfinished_sample(app_factory):
    client = app_factory()
    w, engine = Wire(client), client.app.state.services.engine
    sampler = _sampler(w)
    assert w.post("client/dynamic_config", {}).json()["sample_cancel_enabled"] is True
    engine.gate.clear()
    running = _sample(w, sampler, 0).json()["request_id"]  # taken by the engine's worker
    queued = _sample(w, sampler, 1).json()["request_id"]
    assert w.post("cancel_future", {"request_id": queued}).json() == {"cancelled": True}
    out = w.json_result(queued)
    assert out["category"] == "user" and "cancelled" in out["error"]
    assert_clean_answer(w.post("cancel_future", {"request_id": "req-unknown"}))
    assert w.post("cancel_future", {"request_id": "req-unknown"}).status_code == 404
    engine.gate.set()
    assert w.result(running).headers["content-type"] == "application/x-protobuf"
    assert client.app.state.services.samplers.in_flight == 0


class _DiskFullEngine(FakeEngine):
    """Writes half a checkpoint, then fails as a full disk does."""

    full = False

    def save_adapter(self, run_id: str, out_dir: Path, with_optimizer: bool) -> Future:
        if not self.full:
            return super().save_adapter(run_id, out_dir, with_optimizer)

        def go() -> int:
            (out_dir / "adapter_model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

        return self._call("save", run_id, go)


def test_disk_full_on_save_is_a_clear_error_and_keeps_the_previous_checkpoint(app_factory, tmp_path):
    engine = _DiskFullEngine()
    w = Wire(app_factory(engine))
    m = w.model()
    path = w.json_result(w.post("save_weights", {"model_id": m, "seq_id": 1, "path": "keep"}).json()["request_id"])
    folder = tmp_path / "data" / "checkpoints" / m / "weights" / "keep"
    before = (folder / "adapter_model.safetensors").read_bytes()
    engine.full = True
    out = w.json_result(w.post("save_weights", {"model_id": m, "seq_id": 2, "path": "keep", "overwrite": True})
                        .json()["request_id"])
    assert out["category"] == "server"
    assert "No space left on device" in out["error"] and "previous checkpoint" in out["error"], out
    out = w.json_result(w.post("save_weights", {"model_id": m, "seq_id": 3, "path": "new"}).json()["request_id"])
    assert "No space left on device" in out["error"]
    # The old checkpoint is intact and the failed ones left nothing behind.
    assert (folder / "adapter_model.safetensors").read_bytes() == before
    listed = [c["tinker_path"] for c in w.get(f"training_runs/{m}/checkpoints").json()["checkpoints"]]
    assert listed == [path["path"]]
    assert list((tmp_path / "data" / "checkpoints" / ".staging").iterdir()) == []
    engine.full = False  # space again: saving works, the run is not wedged
    assert "path" in w.json_result(w.post("save_weights", {"model_id": m, "seq_id": 4, "path": "new"})
                                   .json()["request_id"])


def test_a_crash_mid_overwrite_or_mid_write_leaves_no_half_checkpoint(app_factory, tmp_path):
    w = Wire(app_factory())
    m = w.model()
    path = w.json_result(w.post("save_weights", {"model_id": m, "seq_id": 1, "path": "c"}).json()["request_id"])
    ckpts = tmp_path / "data" / "checkpoints"
    folder = ckpts / m / "weights" / "c"
    data = (folder / "adapter_model.safetensors").read_bytes()
    # What a SIGKILL between commit's two renames leaves: the old folder set aside, the new one not in place;
    # and a torn write in staging.
    folder.rename(folder.with_name("c~replaced"))
    torn = ckpts / ".staging" / "deadbeef"
    torn.mkdir(parents=True)
    (torn / "adapter_model.safetensors").write_bytes(b"tor")
    w2 = Wire(app_factory())  # the restart
    assert (folder / "adapter_model.safetensors").read_bytes() == data
    assert not folder.with_name("c~replaced").exists() and list((ckpts / ".staging").iterdir()) == []
    assert w2.post("weights_info", {"tinker_path": path["path"]}).status_code == 200
    listed = [c["tinker_path"] for c in w2.get(f"training_runs/{m}/checkpoints").json()["checkpoints"]]
    assert listed == [path["path"]]


def test_seq_id_far_ahead_and_huge_numbers_are_refused(wire):
    m = wire.model()
    r = wire.post("optim_step", {"model_id": m, "seq_id": 10**30, "adam_params": {"learning_rate": 1e-3}})
    assert r.status_code == 400 and "ahead" in r.json()["detail"]
    sid = wire.session()
    r = wire.post("create_model", {"session_id": sid, "model_seq_id": 0, "base_model": MODEL,
                                   "lora_config": {"rank": 4, "seed": 2**64}})
    assert r.status_code == 400 and "lora_config.seed" in r.json()["detail"]
    assert wire.get("training_runs", params={"offset": 10**30}).status_code == 200


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("127.0.0.1", False), ("::1", False)])
def test_no_auth_warns_when_not_on_loopback(monkeypatch, caplog, tmp_path, host, warned):
    import uvicorn

    from tinkerbell.api import app as app_mod
    from tinkerbell.config import ServeConfig

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setattr(app_mod, "build_engine", lambda config: FakeEngine())
    with caplog.at_level(logging.INFO, logger="tinkerbell.serve"):
        app_mod.serve(ServeConfig(model=MODEL, data_dir=tmp_path / "d", host=host, no_auth=True))
    assert any("--no-auth while listening" in r.message for r in caplog.records) == warned
    shutil.rmtree(tmp_path / "d", ignore_errors=True)
