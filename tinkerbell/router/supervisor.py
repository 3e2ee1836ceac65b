"""`tinkerbell serve --dp N`: N replica processes and the router in front of them, stopped together.

Layout of `--data-dir` (docs/router.md): one shared `tinkerbell.db` (SQLite, WAL: safe for several processes on
one host) and one shared `checkpoints/`, so every replica knows every key, session, run and checkpoint, and any
replica can load any saved adapter; what is per replica is only what lives in memory (training runs' weights
and optimizer state, pending futures). `logs/` holds one log per replica and the router's.

The shared store is prepared here, once, before any replica starts (first API key, URL-signing secret, and
failing every future a previous run left pending), so replicas starting side by side do not race. Replicas
answer only on 127.0.0.1; the router is the one public port.

A replica that dies is restarted on its port with its GPUs, after a backoff (1 s, doubling to 30 s), at most
TINKERBELL_REPLICA_RESTARTS times in a row (default 5; 0 turns restarts off); one that then stays up for a
minute has its count reset. Each replica runs with its own id (TINKERBELL_REPLICA_ID=replica-<i>), which its
futures record in the shared store, so the restarted process fails only its predecessor's pending futures,
never a live replica's (service/futures.py). The router puts it back at its next successful health check.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tinkerbell.config import ConfigError, ServeConfig
from tinkerbell.router import ports
from tinkerbell.service.futures import REPLICA_ID_ENV

log = logging.getLogger("tinkerbell.serve")

REPLICA_START_TIMEOUT = 900.0  # a large model on a slow disk
STOP_GRACE_SECONDS = 20.0
# Flags the supervisor sets per replica itself; every other `serve` flag is passed on as resolved.
NOT_FORWARDED = frozenset({"host", "port", "dp", "api_keys", "health_check_interval", "model"})
RESTARTS_ENV = "TINKERBELL_REPLICA_RESTARTS"
DEFAULT_RESTARTS = 5
RESTART_DELAY_SECONDS = 1.0  # first backoff; doubles per failed attempt in a row
RESTART_DELAY_MAX_SECONDS = 30.0
STABLE_SECONDS = 60.0  # up this long after a restart: the next death starts a fresh count
HEALTH_PROBE_SECONDS = 0.5  # a restarting replica's /healthz is probed at most this often


@dataclasses.dataclass
class Child:
    name: str
    url: str
    log_path: Path
    proc: subprocess.Popen
    gpus: list[str] | None = None
    args: list[str] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Restart bookkeeping (replicas only): "up", "waiting" (backoff until next_start), "starting", "given_up".
    state: str = "up"
    failures: int = 0  # deaths in a row (reset once up for STABLE_SECONDS)
    restarts: int = 0  # restarts in total, for the log
    next_start: float = 0.0
    up_since: float = 0.0
    last_probe: float = 0.0
    spawned_at: float = 0.0


def restart_delay(failures: int) -> float:
    """Seconds to wait before restart attempt `failures` (1, 2, ...): 1, 2, 4, ... capped at 30."""
    return min(RESTART_DELAY_MAX_SECONDS, RESTART_DELAY_SECONDS * 2 ** max(0, failures - 1))


def max_restarts(environ: dict[str, str]) -> int:
    v = environ.get(RESTARTS_ENV, "").strip()
    if not v:
        return DEFAULT_RESTARTS
    try:
        n = int(v)
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(f"environment variable {RESTARTS_ENV} must be an integer >= 0 (restarts of a dead replica "
                          f"in a row; 0 turns restarts off), got {v!r}")
    return n


def replica_ports(config: ServeConfig) -> list[int]:
    return [config.port + 1 + i for i in range(config.dp)]


def check_ports(config: ServeConfig) -> None:
    hint = (f"choose other ports with --port P (the router takes P, its {config.dp} replicas P+1..P+{config.dp}), "
            "or set TINKERBELL_PORT")
    if replica_ports(config)[-1] > 65535:
        raise ConfigError(f"--port {config.port} leaves no room for {config.dp} replica ports above it")
    for host, port in [(config.host, config.port)] + [("127.0.0.1", p) for p in replica_ports(config)]:
        if ports.in_use(host, port):
            raise ConfigError(ports.busy_message(host, port, hint))


def visible_gpus(environ: dict[str, str]) -> list[str]:
    """GPU ids to spread replicas over: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists, else none."""
    v = environ.get("CUDA_VISIBLE_DEVICES")
    if v is not None:
        return [d.strip() for d in v.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def gpu_groups(devices: list[str], dp: int, tp: int) -> list[list[str]] | None:
    """Replica i gets GPUs i*tp..i*tp+tp-1, wrapping around (replicas share GPUs) when there are too few."""
    if not devices:
        return None
    return [[devices[(i * tp + j) % len(devices)] for j in range(tp)] for i in range(dp)]


def replica_args(config: ServeConfig, port: int) -> list[str]:
    from tinkerbell.cli import SERVE_FLAGS

    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--dp", "1", "--model", str(config.model)]
    for flags, dest, kwargs, _ in SERVE_FLAGS:
        if dest in NOT_FORWARDED or not hasattr(config, dest):
            continue
        value = getattr(config, dest)
        if kwargs.get("action") == "store_true":
            if value:
                args.append(flags[0])
        elif value is not None and not isinstance(value, list):
            args += [flags[0], str(value)]
    return args


def prepare_store(config: ServeConfig) -> None:
    """Create the shared store and its one-time secrets before the replicas start side by side."""
    from tinkerbell.service.auth import Authenticator
    from tinkerbell.service.checkpoints import CheckpointManager
    from tinkerbell.service.futures import fail_left_over
    from tinkerbell.service.store import Store

    store = Store(config.data_dir)
    try:
        auth = Authenticator(store, config.data_dir, list(config.api_keys), config.no_auth)
        CheckpointManager(config.data_dir, store)
        # No replica runs yet: whatever is pending was left by a previous run (replica ids may have changed).
        if n := fail_left_over(store, None, everyone=True):
            log.warning("%d request(s) were running when the previous server stopped; they are reported failed", n)
        if not config.no_auth and not config.api_keys and auth.first_key_path is not None:
            log.info("the first API key is in %s (export TINKER_API_KEY=$(cat %s))", auth.first_key_path,
                     auth.first_key_path)
    finally:
        store.close()


def _die_with_parent() -> None:
    # Linux: a replica whose supervisor is killed (even SIGKILL) gets SIGTERM instead of lingering on a GPU.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(name: str, url: str, args: list[str], log_path: Path, env: dict[str, str],
          gpus: list[str] | None = None) -> Child:
    log_file = open(log_path, "ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tinkerbell", *args], stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    finally:
        log_file.close()
    return Child(name, url, log_path, proc, gpus, list(args), dict(env), spawned_at=time.monotonic())


def log_tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Supervisor:
    def __init__(self, config: ServeConfig, environ: dict[str, str] | None = None):
        self.config = config
        self.environ = dict(os.environ if environ is None else environ)
        self.replicas: list[Child] = []
        self.router: Child | None = None
        self._stop_signal: int | None = None
        self.log_dir = Path(config.data_dir) / "logs"
        self.max_restarts = max_restarts(self.environ)

    # ------------------------------------------------------------------------------------------ start

    def start(self) -> None:
        cfg = self.config
        self.log_dir.mkdir(parents=True, exist_ok=True)
        prepare_store(cfg)
        groups = gpu_groups(visible_gpus(self.environ), cfg.dp, cfg.tp)
        if groups and len({g for grp in groups for g in grp}) < cfg.dp * cfg.tp:
            log.warning("%d replica(s) x %d GPU(s) on %d visible GPU(s): replicas share GPUs; each takes "
                        "--gpu-memory-util %.2f of its GPU's memory, so keep their sum below 1", cfg.dp, cfg.tp,
                        len({g for grp in groups for g in grp}), cfg.gpu_memory_util)
        base_env = {k: v for k, v in self.environ.items()
                    if not k.startswith("TINKERBELL_API_KEYS") and k != REPLICA_ID_ENV}
        if cfg.api_keys:
            base_env["TINKERBELL_API_KEYS"] = ",".join(cfg.api_keys)  # not on the command line, where ps shows it
        for i, port in enumerate(replica_ports(cfg)):
            env = dict(base_env)
            env[REPLICA_ID_ENV] = f"replica-{i}"  # the owner its futures record in the shared store
            gpus = groups[i] if groups else None
            if gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
            path = self.log_dir / f"replica-{i}.log"
            self.replicas.append(spawn(f"replica {i}", f"http://127.0.0.1:{port}", replica_args(cfg, port), path,
                                       env, gpus))
        router_log = self.log_dir / "router.log"
        for c in self.replicas:
            where = f"GPU {','.join(c.gpus)}" if c.gpus else "CPU"
            log.info("%s: %s on %s, pid %d, log %s", c.name, c.url, where, c.proc.pid, c.log_path)
        log.info("router log: %s", router_log)
        self._wait_healthy(self.replicas)
        for c in self.replicas:
            c.up_since = time.monotonic()
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        args = ["router", "--host", cfg.host, "--port", str(cfg.port), "--health-check-interval",
                str(cfg.health_check_interval)]
        for c in self.replicas:
            args += ["--replica", c.url]
        self.router = spawn("router", f"http://{host}:{cfg.port}", args, router_log, base_env)
        self._wait_healthy([self.router])
        log.info("serving %s with %d replicas at http://%s:%d (TINKER_BASE_URL=http://%s:%d); Ctrl+C stops all",
                 cfg.model_name, cfg.dp, cfg.host, cfg.port, host, cfg.port)

    def _wait_healthy(self, children: list[Child]) -> None:
        deadline = time.monotonic() + REPLICA_START_TIMEOUT
        waiting = list(children)
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while waiting:
                if self._stop_signal is not None:
                    raise KeyboardInterrupt
                for c in list(waiting):
                    if c.proc.poll() is not None:
                        raise RuntimeError(f"{c.name} exited with status {c.proc.returncode} while starting; the "
                                           f"end of {c.log_path}:\n{log_tail(c.log_path)}")
                    try:
                        if client.get(c.url + "/healthz").status_code == 200:
                            waiting.remove(c)
                    except httpx.HTTPError:
                        pass
                if waiting and time.monotonic() > deadline:
                    raise RuntimeError(f"{waiting[0].name} did not become healthy in {REPLICA_START_TIMEOUT:.0f}s; "
                                       f"see {waiting[0].log_path}")
                time.sleep(0.2)

    # ------------------------------------------------------------------------------------------ run

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def run(self) -> int:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._on_signal)
        try:
            self.start()
        except KeyboardInterrupt:
            self.stop()
            return 0
        except (RuntimeError, OSError) as e:
            log.error("%s", e)
            self.stop()
            return 1
        code = 0
        with httpx.Client(timeout=HEALTH_PROBE_SECONDS, trust_env=False) as probe:
            while self._stop_signal is None:
                for c in self.replicas:
                    self._tend(c, probe)
                if self.router is not None and self.router.proc.poll() is not None:
                    log.error("the router exited with status %s; stopping the replicas. Log: %s",
                              self.router.proc.returncode, self.router.log_path)
                    code = 1
                    break
                if all(c.state == "given_up" for c in self.replicas):
                    log.error("every replica has exited for good; stopping")
                    code = 1
                    break
                time.sleep(0.2)
        self.stop()
        return code

    # ------------------------------------------------------------------------------------------ restarts

    def _tend(self, c: Child, probe: httpx.Client) -> None:
        """One step of a replica's life cycle: notice a death, wait out the backoff, restart, see it healthy."""
        now = time.monotonic()
        if c.state in ("up", "starting") and c.proc.poll() is not None:
            if c.state == "up" and now - c.up_since >= STABLE_SECONDS:
                c.failures = 0  # it had recovered: this death starts a fresh count
            c.failures += 1
            what = "exited" if c.state == "up" else "exited while restarting"
            if c.failures > self.max_restarts:
                c.state = "given_up"
                why = ("restarts are off (TINKERBELL_REPLICA_RESTARTS=0)" if self.max_restarts == 0 else
                       f"{self.max_restarts} restart(s) in a row failed; not restarting it again")
                log.error("%s (%s) %s with status %s; %s. The router routes around it; its training runs resume "
                          "from their last save_state on the other replicas. Log: %s", c.name, c.url, what,
                          c.proc.returncode, why, c.log_path)
                return
            delay = restart_delay(c.failures)
            c.state, c.next_start = "waiting", now + delay
            log.error("%s (%s) %s with status %s; restarting it in %.0f s (attempt %d of %d in a row). Its "
                      "training runs' in-memory state is lost: they resume from their last save_state. Log: %s",
                      c.name, c.url, what, c.proc.returncode, delay, c.failures, self.max_restarts, c.log_path)
        elif c.state == "waiting" and now >= c.next_start:
            self._respawn(c)
        elif c.state == "starting" and now - c.last_probe >= HEALTH_PROBE_SECONDS:
            c.last_probe = now
            if now - c.spawned_at > REPLICA_START_TIMEOUT:
                log.error("%s did not become healthy in %.0f s after its restart; killing it", c.name,
                          REPLICA_START_TIMEOUT)
                c.proc.kill()  # counted as a failed attempt at the next step
                c.proc.wait()
                return
            try:
                ok = probe.get(c.url + "/healthz").status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                c.state, c.up_since = "up", now
                log.info("%s (%s) is back after its restart (pid %d, %.1f s to start); the router takes it back "
                         "at its next health check", c.name, c.url, c.proc.pid, now - c.spawned_at)

    def _respawn(self, c: Child) -> None:
        c.restarts += 1
        with open(c.log_path, "ab") as f:
            f.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} restarted by the supervisor "
                    f"(restart {c.restarts}) ---\n".encode())
        new = spawn(c.name, c.url, c.args, c.log_path, c.env, c.gpus)
        c.proc, c.spawned_at, c.last_probe, c.state = new.proc, new.spawned_at, 0.0, "starting"
        log.info("%s: restarted as pid %d on %s (log %s)", c.name, c.proc.pid, c.url, c.log_path)

    def stop(self) -> None:
        children = ([self.router] if self.router else []) + self.replicas
        for c in children:
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for c in children:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", c.name, STOP_GRACE_SECONDS)
                c.proc.kill()
                c.proc.wait()
        if children:
            log.info("stopped %d process(es)", len(children))


def serve_dp(config: ServeConfig) -> int:
    """Run `serve --dp N` (N > 1) until a signal; the exit status for the command line."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    check_ports(config)
    return Supervisor(config).run()
