"""API test fixtures: the real FastAPI app served by uvicorn on loopback (in a thread), over a FakeEngine or
the real Engine on the tiny fixture model."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import uvicorn

from tests.service.fakes import FakeEngine
from tinkerbell.api.app import create_app
from tinkerbell.config import ServeConfig

KEY_A = "tml-alice-test-key"
KEY_B = "tml-bob-test-key"
MODEL = "/tmp/fx/fake-model"


from tests.ports import free_port  # noqa: E402,F401 - re-exported: api tests import it from here


class LiveServer:
    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_keep_alive=75))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def make_config(data_dir: Path, **kw) -> ServeConfig:
    kw.setdefault("api_keys", [KEY_A, KEY_B])
    kw.setdefault("long_poll_seconds", 2.0)
    return ServeConfig(model=kw.pop("model", MODEL), data_dir=data_dir, **kw)


@pytest.fixture
def fake_engine() -> Iterator[FakeEngine]:
    eng = FakeEngine()
    yield eng
    eng.shutdown()


@pytest.fixture
def fake_server(tmp_path, fake_engine) -> Iterator[LiveServer]:
    with LiveServer(create_app(make_config(tmp_path / "data"), fake_engine)) as srv:
        yield srv


@pytest.fixture
def app_factory(tmp_path):
    """Build apps on one data dir (call again for a restart); each gets its own FakeEngine unless given one."""
    from fastapi.testclient import TestClient

    made: list[tuple[TestClient, FakeEngine]] = []

    def make(engine: FakeEngine | None = None, **kw) -> TestClient:
        eng = engine or FakeEngine()
        kw.setdefault("long_poll_seconds", 0.3)
        client = TestClient(create_app(make_config(tmp_path / "data", **kw), eng))
        client.__enter__()
        made.append((client, eng))
        return client

    yield make
    for client, eng in reversed(made):
        eng.gate.set()
        client.__exit__(None, None, None)
        eng.shutdown()


@pytest.fixture
def wire(app_factory):
    from tests.api.helpers import Wire

    client = app_factory()
    w = Wire(client)
    w.engine = client.app.state.services.engine
    return w
