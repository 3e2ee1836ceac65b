"""The `tinkerbell router` subcommand's flags and entry point (tinkerbell/cli.py delegates here)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from tinkerbell.config import ConfigError
from tinkerbell.router.server import RouterConfig

# flag -> environment variables, first one set wins (as for `serve`)
ROUTER_ENV: dict[str, tuple[str, ...]] = {
    "replicas": ("TINKERBELL_REPLICAS",),
    "host": ("TINKERBELL_HOST",),
    "port": ("TINKERBELL_PORT",),
    "health_check_interval": ("TINKERBELL_HEALTH_CHECK_INTERVAL",),
}


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    d = RouterConfig()

    def env(dest: str) -> str:
        return ", ".join(ROUTER_ENV[dest])

    p = sub.add_parser("router", help="spread requests over replicas (started for you by `serve --dp N`)",
                       description="Run the router alone over replicas started elsewhere (each a `tinkerbell serve` "
                       "sharing one --data-dir). Every flag falls back to its environment variable, then to its "
                       "default.")
    p.add_argument("--replica", dest="replicas", action="append", metavar="URL",
                   help=f"A replica's base URL, e.g. http://127.0.0.1:8001 (repeatable; the environment variable "
                   f"takes a comma-separated list) [env: {env('replicas')}]")
    p.add_argument("--host", metavar="HOST", help=f"Address to listen on. [env: {env('host')}; default: {d.host}]")
    p.add_argument("--port", type=int, metavar="PORT",
                   help=f"Port to listen on. [env: {env('port')}; default: {d.port}]")
    p.add_argument("--health-check-interval", dest="health_check_interval", type=float, metavar="SECONDS",
                   help=f"Seconds between health checks of each replica. [env: {env('health_check_interval')}; "
                   f"default: {d.health_check_interval:g}]")
    return p


def config_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> RouterConfig:
    environ = os.environ if environ is None else environ
    cfg = RouterConfig()
    for dest, names in ROUTER_ENV.items():
        value = getattr(args, dest, None)
        if value is None:
            raw = next((environ[n] for n in names if environ.get(n)), None)
            if raw is None:
                continue
            try:
                value = ([u.strip() for u in raw.split(",") if u.strip()] if dest == "replicas" else
                         int(raw) if dest == "port" else float(raw) if dest == "health_check_interval" else raw)
            except ValueError:
                raise ConfigError(f"environment variable {' / '.join(names)} has a bad value {raw!r}") from None
        setattr(cfg, dest, value)
    return cfg.validate()


def main(args: argparse.Namespace) -> None:
    """Validate, check the port, run until stopped. Raises ConfigError for the caller to print."""
    from tinkerbell.router import ports
    from tinkerbell.router.server import run

    cfg = config_from(args)
    if ports.in_use(cfg.host, cfg.port):
        raise ConfigError(ports.busy_message(cfg.host, cfg.port, "choose another with --port (or TINKERBELL_PORT)"))
    run(cfg)
