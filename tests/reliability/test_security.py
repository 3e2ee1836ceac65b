"""Tenant isolation over every id-bearing route (enumerated from the app, so a new route is probed too), keys
hashed at rest and never logged, checkpoint names that cannot leave the data dir."""

from __future__ import annotations

import logging
import re

from tests.api.conftest import KEY_A, KEY_B
from tests.api.helpers import Wire

# Path parameters and what to put in them; a route with another id-bearing parameter fails the test, so it
# gets added here (and probed) rather than skipped silently.
KNOWN = {"session_id", "sampler_id", "run", "kind", "name", "file", "model_id", "request_id", "adapter",
         "lora_name", "path", "checkpoint", "future_id", "name_or_path", "model"}


def test_every_id_bearing_route_hides_other_tenants_objects(wire, caplog):
    alice, bob = wire, Wire(wire.c, KEY_B)
    sid = alice.session()
    m = alice.model(sid)
    r = alice.post("save_weights", {"model_id": m, "seq_id": 1, "path": "secret"})
    ckpt = alice.json_result(r.json()["request_id"])["path"]
    smp = alice.post("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0,
                                                 "model_path": ckpt}).json()["sampling_session_id"]
    values = {"session_id": sid, "sampler_id": smp, "run": m, "model_id": m, "kind": "weights", "name": "secret",
              "request_id": r.json()["request_id"], "model": ckpt}
    probed = 0
    # The app's own route table, as its OpenAPI schema lists it (FastAPI includes routers lazily).
    for route_path, ops in wire.c.app.openapi()["paths"].items():
        params = set(re.findall(r"{(\w+)(?::\w+)?}", route_path))
        if not params or route_path.startswith("/api/v1/download"):  # download: signature-authorised, below
            continue
        assert params <= KNOWN, f"{route_path}: teach this test the parameter(s) {params - KNOWN}"
        if not params & set(values):
            continue
        path = re.sub(r"{(\w+)(?::\w+)?}", lambda mt: str(values.get(mt.group(1), "x")), route_path)
        for method in sorted(m.upper() for m in ops):
            ans = bob.c.request(method, path, json={}, headers=bob.h)
            assert ans.status_code in (404, 410), f"{method} {path} answered {ans.status_code} to another tenant"
            probed += 1
    assert probed >= 8
    # Body-borne ids too.
    for endpoint, body in (("get_info", {"model_id": m}), ("weights_info", {"tinker_path": ckpt}),
                           ("retrieve_future", {"request_id": values["request_id"]}),
                           ("cancel_future", {"request_id": values["request_id"]}),
                           ("create_sampling_session", {"session_id": bob.session(), "sampling_session_seq_id": 0,
                                                        "model_path": ckpt}),
                           ("optim_step", {"model_id": m, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}}),
                           ("asample", {"sampling_session_id": smp, "prompt": {"chunks": []}})):
        assert bob.post(endpoint, body).status_code in (404, 410), endpoint
    assert ckpt not in bob.get("checkpoints").text and m not in bob.get("training_runs").text
    # Alice still sees all of it.
    assert alice.get(f"training_runs/{m}/checkpoints").status_code == 200


def test_keys_hashed_at_rest_and_never_logged(app_factory, tmp_path, caplog):
    with caplog.at_level(logging.DEBUG):
        client = app_factory()
        w = Wire(client)
        w.model()
        Wire(client, "tml-wrong-key-123456").get("training_runs")
    db = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("tinkerbell.db*"))
    for key in (KEY_A, KEY_B):
        assert key.encode() not in db
        assert key not in caplog.text
    assert "tml-wrong-key-123456" not in caplog.text


def test_checkpoint_names_cannot_escape_the_data_dir(wire, tmp_path):
    m = wire.model()
    for seq, name in enumerate(["../../evil", "..", "a/b", "/abs", ".hidden", "x~replaced", "a\x00b", "é"], 1):
        out = wire.json_result(wire.post("save_weights", {"model_id": m, "seq_id": seq, "path": name})
                               .json()["request_id"])
        assert out["category"] == "user" and "checkpoint name" in out["error"], (name, out)
    for path in ("tinker://../../x/weights/a", f"tinker://{m}/weights/..", f"tinker://{m}/../../weights/x"):
        assert wire.post("weights_info", {"tinker_path": path}).status_code in (400, 404)
    data = tmp_path / "data"
    assert not (data.parent / "evil").exists() and not any(p.name == "evil" for p in data.rglob("*"))
    # A forged download link reveals nothing.
    assert wire.c.get("/api/v1/download/x/y/../../tinkerbell.db", params={"expires": 2**40, "sig": "é"}
                      ).status_code == 404
