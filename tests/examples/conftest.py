"""One real server (tiny Llama fixture) for the examples, which run as subprocesses exactly as a user runs them."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import KEY_ALICE, ServerProcess


@pytest.fixture(scope="session")
def example_server(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    srv = ServerProcess(tiny_llama_dir, root / "data", root / "server.log", ["--api-key", KEY_ALICE]).start()
    try:
        yield srv
    finally:
        srv.stop()
