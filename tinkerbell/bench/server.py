"""Start `tinkerbell serve` for the benchmark and stop it afterwards: the same subprocess a user would run
(supervisor.spawn: it dies with us even on SIGKILL), on a free loopback port, with its own data dir, so the
benchmark never shares a store or a port with anything else."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tinkerbell.router.ports import free_port_block
from tinkerbell.router.supervisor import Child, log_tail, spawn

START_TIMEOUT = 900.0  # a large model from a slow disk


@dataclass
class ServerLauncher:
    """How to start servers of one model; `start(dp=...)` gives one running server."""
    model: str
    work_dir: Path  # data dirs and logs of the servers started here
    extra: list[str] = field(default_factory=list)  # more `serve` flags (--dtype, --max-loras, ...)
    tp: int = 1
    api_key: str = field(default_factory=lambda: "tml-bench-" + secrets.token_hex(8))

    def start(self, dp: int = 1, name: str = "server") -> "RunningServer":
        port = free_port_block(dp + 1)
        data_dir = self.work_dir / f"{name}-data"
        log_path = self.work_dir / f"{name}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        args = ["serve", "--model", self.model, "--host", "127.0.0.1", "--port", str(port), "--data-dir",
                str(data_dir), "--dp", str(dp), *(["--tp", str(self.tp)] if self.tp != 1 else []), *self.extra]
        # The key travels in the environment, not on the command line where `ps` shows it.
        env = dict(os.environ, TINKERBELL_API_KEYS=self.api_key, PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false")
        child = spawn(name, f"http://127.0.0.1:{port}", args, log_path, env)
        server = RunningServer(child, self.api_key)
        try:
            server.wait_healthy()
        except BaseException:
            server.stop()
            raise
        return server


@dataclass
class RunningServer:
    child: Child
    api_key: str

    @property
    def url(self) -> str:
        return self.child.url

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.child.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with status {self.child.proc.returncode} while "
                                       f"starting; the end of {self.child.log_path}:\n{log_tail(self.child.log_path)}")
                try:
                    if client.get(self.url + "/healthz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"the server did not become healthy in {timeout:.0f}s; see {self.child.log_path}")

    def stop(self, grace: float = 30.0) -> None:
        proc = self.child.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
