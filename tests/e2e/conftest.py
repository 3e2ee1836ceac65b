"""End-to-end fixtures: the real `tinkerbell serve` process on loopback, driven by the official clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

KEY_ALICE = "tml-alice-e2e-key"
KEY_BOB = "tml-bob-e2e-key"


from tests.ports import free_port  # noqa: E402,F401 - re-exported: e2e tests import it from here


class ServerProcess:
    """`python -m tinkerbell serve` in a subprocess; restartable on the same data dir."""

    def __init__(self, model: Path, data_dir: Path, log_path: Path, extra: list[str] | None = None):
        self.model, self.data_dir, self.log_path = model, data_dir, log_path
        self.extra = extra or []
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        cmd = [sys.executable, "-m", "tinkerbell", "serve", "--model", str(self.model), "--host", "127.0.0.1",
               "--port", str(self.port), "--data-dir", str(self.data_dir), *self.extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _server(model: Path, root: Path, name: str, extra: list[str] | None = None):
    data = root / f"{name}-data"
    srv = ServerProcess(model, data, root / f"{name}.log",
                        ["--api-key", KEY_ALICE, "--api-key", KEY_BOB, *(extra or [])])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def llama_server(tiny_llama_dir, tmp_path_factory):
    yield from _server(tiny_llama_dir, tmp_path_factory.mktemp("srv"), "llama")


@pytest.fixture(scope="session")
def qwen3_server(tiny_qwen3_dir, tmp_path_factory):
    yield from _server(tiny_qwen3_dir, tmp_path_factory.mktemp("srv"), "qwen3")


@pytest.fixture(params=["llama", "qwen3"])
def any_server(request):
    return request.getfixturevalue(f"{request.param}_server")


def service_client(server: ServerProcess, key: str = KEY_ALICE):
    import tinker

    return tinker.ServiceClient(base_url=server.url, api_key=key)


def rest_client(server: ServerProcess, key: str = KEY_ALICE):
    import tinker

    return tinker.RestClient(base_url=server.url, api_key=key)


def train_until_memorised(tc, datum, lr: float = 1e-2, max_steps: int = 80, target: float = 0.02) -> tuple[float, float]:
    """forward_backward + optim_step (pipelined, as the cookbook does) until the loss is under `target` × the
    first loss; returns (first, last) losses. Stopping early keeps Adam from overshooting a memorised answer."""
    from tinker import types

    first = last = None
    for _ in range(max_steps):
        fb = tc.forward_backward([datum], "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=lr))
        last = fb.result().metrics["loss:sum"]
        opt.result()
        first = last if first is None else first
        if last < target * first:
            break
    return first, last
