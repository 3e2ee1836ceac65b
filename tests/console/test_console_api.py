"""The console's JSON routes without a browser: tenant isolation, the CSRF guard, path safety, page weight and
packaging. In-process app over the fake engine, so these run in a second."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import KEY_A, KEY_B, make_config
from tests.service.fakes import FakeEngine
from tinkerbell.api.app import create_app
from tinkerbell.api.console import live, pages
from tinkerbell.service.auth import tenant_for_configured_key

RUN = "11111111-2222-3333-4444-555555555555:train:0"
CKPT = f"/console/api/checkpoints/{RUN}/sampler_weights/s1"
CSRF = {"X-Tinkerbell-Console": "1"}


@pytest.fixture()
def client(tmp_path: Path):
    app = create_app(make_config(tmp_path / "data"), engine=FakeEngine())
    s = app.state.services
    alice = tenant_for_configured_key(KEY_A)
    s.store.add_run(RUN, alice, None, s.model_name, 8, True, True, True, None, {"type": "adamw"}, {"note": "<b>x"})
    for i, loss in enumerate([4.0, 2.0, 1.0], start=1):
        s.store.add_metrics(RUN, 2 * i - 1, "forward_backward", {"loss:sum": loss})
        s.store.add_metrics(RUN, 2 * i, "optim_step", {"learning_rate": 1e-3})
    folder = s.checkpoints.dir_for(RUN, "sampler_weights", "s1")
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    s.store.put_checkpoint(RUN, "sampler_weights", "s1", alice, f"tinker://{RUN}/sampler_weights/s1", 66, None, None)
    with TestClient(app) as c:
        yield c


def test_runs_and_metrics_are_the_tenants_own(client: TestClient) -> None:
    a, b = {"X-API-Key": KEY_A}, {"X-API-Key": KEY_B}
    assert client.get("/console/api/runs").status_code == 401
    runs = client.get("/console/api/runs", headers=a).json()["runs"]
    assert [r["model_id"] for r in runs] == [RUN] and runs[0]["steps"] == 3 and runs[0]["last_loss"] == 1.0
    detail = client.get(f"/console/api/runs/{RUN}", headers=a).json()
    assert [h["metrics"]["loss:sum"] for h in detail["history"] if h["kind"] == "forward_backward"] == [4.0, 2.0, 1.0]
    assert client.get("/console/api/runs", headers=b).json()["runs"] == []
    assert client.get(f"/console/api/runs/{RUN}", headers=b).status_code == 404
    assert client.get("/console/api/checkpoints", headers=b).json()["checkpoints"] == []
    assert client.get(CKPT + "/archive", headers=b).status_code == 404
    for method, path, body in (("DELETE", CKPT, None), ("POST", CKPT + "/publish", {"public": True}),
                               ("POST", CKPT + "/ttl", {"ttl_seconds": 60})):
        assert client.request(method, path, json=body, headers={**b, **CSRF}).status_code == 404
    models = client.get("/console/api/playground/models", headers=b).json()["models"]
    assert [m["group"] for m in models] == ["base"]


def test_actions_need_the_console_header(client: TestClient) -> None:
    a = {"X-API-Key": KEY_A}
    r = client.post(CKPT + "/publish", json={"public": True}, headers=a)
    assert r.status_code == 400 and "x-tinkerbell-console" in r.json()["detail"]
    assert client.delete(CKPT, headers=a).status_code == 400
    assert client.post(CKPT + "/publish", json={"public": True}, headers={**a, **CSRF}).json() == {"public": True}
    assert client.get("/console/api/checkpoints", headers=a).json()["checkpoints"][0]["public"] is True
    assert client.post(CKPT + "/ttl", json={"ttl_seconds": "1h"}, headers={**a, **CSRF}).status_code == 400
    archive = client.get(CKPT + "/archive", headers=a)
    assert archive.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
    assert sorted(n.split("/", 1)[1] for n in names) == ["adapter_config.json", "adapter_model.safetensors"]
    assert client.delete(CKPT, headers={**a, **CSRF}).status_code == 200
    assert client.get("/console/api/checkpoints", headers=a).json()["checkpoints"] == []


def test_pages_are_small_offline_shells(client: TestClient) -> None:
    total = 0
    for path in ("/console/runs", f"/console/runs/{RUN}", "/console/checkpoints", "/console/playground",
                 "/console/live", "/console/bench"):
        r = client.get(path)
        assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
        assert "http://" not in r.text and "https://" not in r.text  # no CDN, nothing from elsewhere
        total = max(total, len(r.content))
    assets = sum(len(client.get(f"/console/static/{f.name}").content) for f in pages.STATIC.iterdir())
    assert total + assets < 200_000, f"a page with all its assets weighs {total + assets} bytes"
    assert client.get("/console/static/..%2Fdata.py").status_code == 404
    assert client.get("/console/api/bench/file/../../tinkerbell.db", headers={"X-API-Key": KEY_A}).status_code == 404
    assert client.get("/console/api/bench", headers={"X-API-Key": KEY_A}).json()["files"] == []


def test_packaged_assets_are_declared() -> None:
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"tinkerbell.api.console"' in text
    for f in pages.STATIC.iterdir():
        assert f"static/*{f.suffix}" in text, f"{f.name} would not ship in the wheel"


def test_merge_replicas_for_the_router() -> None:
    row = live.replica_view({"model": "m", "engine": {"sampler": {"running_seqs": 2, "tokens_generated": 10},
                                                      "trainer": {"tokens_trained": 5}}}, None, [])
    doc = live.merge_replicas([{"name": "r0", "healthy": True, "view": row, "error": None},
                               {"name": "r1", "healthy": False, "view": None, "error": "connection refused"},
                               {"name": "r2", "healthy": True, "view": row, "error": None}])
    assert doc["healthy"] == 2 and doc["total"] == 3
    assert doc["totals"]["running"] == 4 and doc["totals"]["tokens_sampled"] == 20
    # What the router does with each replica's own /console/api/live answer:
    rows = [live.replica_row("http://r0", True, doc), live.replica_row("http://r1", True, None, "timed out")]
    merged = live.merge_replicas(rows)
    assert merged["healthy"] == 1 and merged["replicas"][1]["error"] == "timed out"
    assert merged["replicas"][0]["view"]["sequences"]["running"] == 2
