"""The HTTP application: builds the service around one engine and serves it with uvicorn.

`create_app` opens the store, fails futures a previous process left pending, and wires auth, sessions, runs,
checkpoints, samplers and the routers. Adapters are not re-registered eagerly: checkpoints load lazily on first
use. `serve` runs it (HTTP/1.1 keep-alive, long enough that SDK connection pools are not cut between polls).
"""

from __future__ import annotations

import contextlib
import os
import sys
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI

from tinkerbell.api import codec, errors, ops
from tinkerbell.api import diffusion as diffusion_api
from tinkerbell.api import openai as openai_api
from tinkerbell.api.compat import router as compat_router
from tinkerbell.api.console import router as console_router
from tinkerbell.api.tinker import Services
from tinkerbell.api.tinker import router as tinker_router
from tinkerbell.config import ConfigError, ServeConfig, resolve_default_model
from tinkerbell.service.auth import Authenticator
from tinkerbell.service.checkpoints import CheckpointManager
from tinkerbell.service.futures import FutureRegistry
from tinkerbell.service.runs import RunManager
from tinkerbell.service.samplers import SamplerManager
from tinkerbell.service.sessions import SessionManager
from tinkerbell.service.store import Store

if TYPE_CHECKING:
    from tinkerbell.engine.engine import Engine

log = logging.getLogger("tinkerbell.serve")


class _CountRequests:
    """Pure ASGI middleware counting requests and error answers for /stats and /metrics (408 try_again is
    a normal long-poll answer, not an error)."""

    def __init__(self, app: Any, counters: ops.OpsCounters):
        self.app, self.counters = app, counters

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.counters.requests += 1

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 400 and status != 408:
                    self.counters.errors += 1
            await send(message)

        await self.app(scope, receive, send_wrapper)


def build_engine(config: ServeConfig) -> "Engine":
    from tinkerbell.engine.engine import Engine, EngineConfig

    return Engine(EngineConfig(model=config.model or "", dtype=config.dtype, max_loras=config.max_loras,
                               max_lora_rank=config.max_lora_rank, gpu_memory_util=config.gpu_memory_util,
                               allow_download=config.allow_download, algorithm=config.algorithm,
                               batch_size=config.batch_size, max_wait_time=config.max_wait_time,
                               dcp_path=config.dcp_path, tp=config.tp))


def build_services(config: ServeConfig, engine: "Engine") -> Services:
    store = Store(config.data_dir)
    futures = FutureRegistry(store)
    futures.recover_after_restart()
    auth = Authenticator(store, config.data_dir, list(config.api_keys), config.no_auth)
    sessions = SessionManager(store)
    checkpoints = CheckpointManager(config.data_dir, store)
    runs = RunManager(store, futures, sessions, checkpoints, engine, config.model_name, config.max_lora_rank,
                      codec.encode_forward_backward_output)
    samplers = SamplerManager(store, futures, sessions, checkpoints, engine, config.model_name,
                              codec.encode_sample_response)
    runs.samplers = samplers
    samplers.max_queued = config.max_queued_requests
    arch = getattr(getattr(engine, "model_config", None), "arch", None) or "llama"
    return Services(config=config, engine=engine, store=store, auth=auth, futures=futures, sessions=sessions,
                    checkpoints=checkpoints, runs=runs, samplers=samplers, model_name=config.model_name, arch=arch)


def create_app(config: ServeConfig, engine: "Engine | None" = None) -> FastAPI:
    if not config.model:
        resolve_default_model(config, log)
    owns_engine = engine is None
    if engine is None:
        engine = build_engine(config)
    services = build_services(config, engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if owns_engine:
                engine.shutdown()
            services.store.close()

    app = FastAPI(title="Tinkerbell", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.services = services
    app.state.ops = ops.OpsCounters()
    errors.install(app)
    app.include_router(tinker_router)
    app.include_router(ops.router)
    app.include_router(console_router)  # /console and /console/api/*
    diffusion_api.install(app)  # /generation/algorithms, /batch/stats (diffusion LMs)
    openai_api.install(app)  # /v1/*: OpenAI-shaped errors, its own catch-all for unknown /v1 paths
    app.include_router(compat_router)  # the original client API; after the others, whose paths win
    app.add_middleware(_CountRequests, counters=app.state.ops)
    return app


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


# The engine thread and the event loop share one GIL; TINKERBELL_GIL_SWITCH_INTERVAL (seconds) sets CPython's
# switch interval for the API process. Left at CPython's 5 ms by default: on an H100 (1B, 256 clients, 128/128)
# 0.5 ms gave +16% non-streamed but -20% streamed output tok/s (bench/gil_switch.py, docs/benchmarks.md).


def _tune_gil_switch_interval() -> None:
    raw = os.environ.get("TINKERBELL_GIL_SWITCH_INTERVAL", "")
    if not raw:
        return
    try:
        value = float(raw)
        if not value > 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"TINKERBELL_GIL_SWITCH_INTERVAL must be a positive number of seconds, got {raw!r}") from None
    sys.setswitchinterval(value)


def serve(config: ServeConfig) -> None:
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config.validate()
    if not config.model:
        resolve_default_model(config, log)
    _tune_gil_switch_interval()
    app = create_app(config)
    services: Services = app.state.services
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    log.info("serving %s at http://%s:%d (TINKER_BASE_URL=http://%s:%d)", config.model_name, config.host,
             config.port, host, config.port)
    if config.no_auth:
        log.info("auth is off (--no-auth): any key starting with tml- works, e.g. TINKER_API_KEY=tml-local")
        if not is_loopback(config.host):
            log.warning("--no-auth while listening on %s: anyone who can reach this address can train, sample and "
                        "delete checkpoints; bind to 127.0.0.1 or drop --no-auth", config.host)
    elif services.auth.first_key_path is not None:
        log.info("the first API key is in %s (export TINKER_API_KEY=$(cat %s))", services.auth.first_key_path,
                 services.auth.first_key_path)
    else:
        log.info("API keys: those given with --api-key / TINKERBELL_API_KEYS, or created with `tinkerbell keys "
                 "create --data-dir %s`", config.data_dir)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_keep_alive=75,
                access_log=False)
