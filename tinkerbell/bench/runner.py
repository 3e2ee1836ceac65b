"""One benchmark run: find or start the server, run the chosen scenarios in order (a failing scenario is
recorded and the others still run), draw the plots, write report.md and results.json, stop what it started."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

from tinkerbell.bench import env as envmod
from tinkerbell.bench import load, plots, progress, report
from tinkerbell.bench.context import SCENARIOS, Context, ScenarioResult, Sizes, Target
from tinkerbell.bench.peer import Peer
from tinkerbell.bench.server import RunningServer, ServerLauncher


@dataclass
class BenchConfig:
    url: str | None = None
    api_key: str | None = None
    model: str | None = None  # with url: the local folder of the served model, for the peer and roofline
    tp: int = 1
    dp: int = 1
    serve_args: list[str] = field(default_factory=list)  # more `serve` flags when bench starts the server
    scenarios: tuple[str, ...] = SCENARIOS
    quick: bool = False
    out: Path | None = None
    data_dir: Path = Path("data")
    peer: bool = True
    progress: bool = True
    scaling_dp: tuple[int, ...] | None = None
    command: str = "tinkerbell bench"


def default_out(data_dir: Path) -> Path:
    """<data-dir>/bench/<UTC timestamp>/: the console lists reports from <data-dir>/bench."""
    return Path(data_dir) / "bench" / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def api_key_for(cfg: BenchConfig) -> str:
    if cfg.api_key:
        return cfg.api_key
    if os.environ.get("TINKER_API_KEY"):
        return os.environ["TINKER_API_KEY"]
    first = Path(cfg.data_dir) / "first-api-key"
    if first.exists():
        return first.read_text().strip()
    return "tml-local"  # what a --no-auth server accepts


def server_info(url: str, key: str) -> dict:
    r = httpx.get(url.rstrip("/") + "/get_info", headers={"X-API-Key": key}, timeout=60, trust_env=False)
    if r.status_code == 401:
        raise RuntimeError(f"{url} refused the API key (HTTP 401): pass --api-key or set TINKER_API_KEY")
    r.raise_for_status()
    return r.json()


def default_scaling_dp(quick: bool, gpus: int, tp: int) -> tuple[int, ...]:
    if quick:
        return (1, 2)  # CPU: the replicas share the cores; the point is that the path works end to end
    sizes = [d for d in (1, 2, 4, 8) if d * tp <= max(gpus, 1)]
    return tuple(sizes)


def _serve_args(cfg: BenchConfig, sizes: Sizes) -> list[str]:
    args = list(cfg.serve_args)
    if "lora" in cfg.scenarios and "--max-loras" not in args:
        args += ["--max-loras", str(max(sizes.lora_counts))]  # every adapter of the sweep resident at once
    return args


def _run_scenario(name: str, ctx: Context) -> ScenarioResult:
    progress.say(f"[{name}]")
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(f"tinkerbell.bench.{name}")
        res: ScenarioResult = module.run(ctx)
    except Exception as e:  # noqa: BLE001 - one broken scenario must not lose the others' results
        res = ScenarioResult(name, status="failed", reason=f"{type(e).__name__}: {e}"[:500])
        res.notes.append("traceback (last lines): " + " / ".join(traceback.format_exc().strip().splitlines()[-4:]))
        progress.say(f"  {name} failed: {res.reason}")
    res.seconds = time.perf_counter() - t0
    if res.status == "skipped":
        progress.say(f"  skipped: {res.reason}")
    res.plots = plots.draw(res, ctx.out_dir)
    return res


def run(cfg: BenchConfig) -> tuple[report.Run, Path]:
    started = time.perf_counter()
    sizes = Sizes.quick() if cfg.quick else Sizes()
    out_dir = cfg.out or default_out(cfg.data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tinkerbell-bench-"))
    launcher: ServerLauncher | None = None
    server: RunningServer | None = None
    peer: Peer | None = None
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        if cfg.url:
            url, key = cfg.url.rstrip("/"), api_key_for(cfg)
        else:
            if not cfg.model:
                raise ValueError("give --url (a running server) or --model (bench starts one)")
            launcher = ServerLauncher(cfg.model, work, _serve_args(cfg, sizes), tp=cfg.tp)
            progress.say(f"starting tinkerbell serve --model {cfg.model} --dp {cfg.dp} (log: {out_dir / 'server.log'})")
            server = launcher.start(dp=cfg.dp, name="server")
            url, key = server.url, server.api_key
        info = server_info(url, key)
        target = Target(url, key, str(info.get("model_name") or cfg.model), info)
        model_path = envmod.local_model_path(cfg.model or target.model)
        environment = envmod.collect(info, url, server is not None, model_path, cfg.dp, cfg.tp)
        if cfg.peer and model_path:
            peer = Peer(model_path, environment.dtype, target.vocab_size)
        ctx = Context(target, sizes, cfg.quick, out_dir, environment, cfg.progress, peer, launcher,
                      cfg.scaling_dp or default_scaling_dp(cfg.quick, len(environment.gpus), cfg.tp), seed=0)
        progress.say(f"benchmarking {target.model} at {url} on {environment.device} ({environment.dtype}); "
                     f"report in {out_dir}")
        load.warm_up(target)
        results: list[ScenarioResult] = []
        run_ = report.Run(created, cfg.command, cfg.quick, environment, sizes.to_dict(), results, 0.0)
        for name in [s for s in SCENARIOS if s in cfg.scenarios]:  # scaling last: it replaces the server
            if name == "scaling" and server is not None:
                server.stop()  # scaling starts its own servers; keep the machine to one at a time
                server = None
            if name == "scaling" and peer is not None:
                peer.close()  # give its GPU memory back before the scaling servers size their KV caches
            res = _run_scenario(name, ctx)
            if cfg.peer and not model_path and res.name in ("sampling", "training") and res.status == "ok":
                res.notes.append("no peer baseline: the model is not a folder on this machine (pass --model)")
            results.append(res)
            # The report so far, after every scenario: a run cut short (a time limit, a crash) keeps what it
            # measured.
            run_.seconds = time.perf_counter() - started
            report.write(run_, out_dir)
        run_.seconds = time.perf_counter() - started
        report.write(run_, out_dir)
        return run_, out_dir
    finally:
        if server is not None:
            server.stop()
        if peer is not None:
            peer.close()
        for log in work.glob("*.log"):  # server logs stay with the report; data dirs go
            shutil.copy(log, out_dir / log.name)
        shutil.rmtree(work, ignore_errors=True)
