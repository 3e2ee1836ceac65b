"""The `tinkerbell` command line (DESIGN.md, Configuration: the flags are a contract the tests and launch
scripts rely on).

Every `serve` flag falls back to its environment variable(s) (`tinkerbell.config.ENV_ALIASES`), then to the
`ServeConfig` default; the command line always wins. docs/configuration.md is generated from this parser
(scripts/gen_config_docs.py), so help texts here are the reference documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tinkerbell.config import (
    DIFFUSION_ALGORITHMS,
    DTYPES,
    ENV_ALIASES,
    ConfigError,
    ServeConfig,
    check_tp,
    env_value,
    from_env,
    resolve_default_model,
)

log = logging.getLogger("tinkerbell")

# Subcommands the design reserves but this build does not ship yet.
NOT_YET: dict[str, str] = {}

# (flags, dest, argparse kwargs, help) for `serve`; dest names match ServeConfig fields and ENV_ALIASES keys.
SERVE_FLAGS: list[tuple[tuple[str, ...], str, dict[str, Any], str]] = [
    (("--model",), "model", {"metavar": "M"},
     "Base model: a Hugging Face id (local cache or download) or a local folder. Clients see it under exactly "
     "this name. Absent: HuggingFaceTB/SmolLM2-135M-Instruct when cached or downloadable, else the built-in "
     "demo model."),
    (("--served-model-name",), "served_model_name", {"metavar": "NAME"},
     "Name clients use for the base model instead of --model."),
    (("--host",), "host", {"metavar": "HOST"}, "Address to listen on."),
    (("--port",), "port", {"type": int, "metavar": "PORT"}, "Port to listen on."),
    (("--data-dir",), "data_dir", {"type": Path, "metavar": "DIR"},
     "Holds tinkerbell.db (API keys, sessions, runs, futures) and checkpoints/."),
    (("--dtype",), "dtype", {"choices": DTYPES},
     "Weight and activation dtype; auto = bfloat16 on GPU, float32 on CPU."),
    (("--api-key",), "api_keys", {"action": "append", "metavar": "KEY"},
     "Accept this API key (repeatable; must start with tml-). The environment variable takes a "
     "comma-separated list. Keys minted with `tinkerbell keys create` are accepted too."),
    (("--no-auth",), "no_auth", {"action": "store_true", "default": None},
     "Accept requests without an API key (local single-user use)."),
    (("--tp",), "tp", {"type": int, "metavar": "T"},
     "Tensor-parallel GPUs per replica: the base model (and every LoRA adapter) is split over T GPUs of one host, "
     "one process per GPU (NCCL; on a CPU-only machine T processes on gloo). T must divide the model's attention "
     "heads and MLP width. Not with diffusion models or --dcp-path (use --dp). See docs/multi_gpu.md."),
    (("--dp",), "dp", {"type": int, "metavar": "D"},
     "Data-parallel replicas: D > 1 starts D replica processes on 127.0.0.1, ports PORT+1..PORT+D (each on its "
     "own GPU group when there are GPUs), sharing --data-dir, and the router on --port (docs/router.md)."),
    (("--health-check-interval",), "health_check_interval", {"type": float, "metavar": "SECONDS"},
     "With --dp > 1: seconds between the router's health checks of each replica."),
    (("--gpu-memory-util",), "gpu_memory_util", {"type": float, "metavar": "F"},
     "Fraction of the free GPU memory the sampler's KV cache may take (diffusion LMs: the running requests' "
     "caches; more requests wait); the rest serves training."),
    (("--max-loras",), "max_loras", {"type": int, "metavar": "N"},
     "Adapters resident at once (LoRA slots)."),
    (("--max-lora-rank",), "max_lora_rank", {"type": int, "metavar": "R"}, "Largest LoRA rank accepted."),
    (("--max-queued-requests",), "max_queued_requests", {"type": int, "metavar": "N"},
     "Sampling requests (Tinker asample and OpenAI) admitted but not yet finished; a request beyond this gets "
     "429 with Retry-After (the tinker SDK backs off and resubmits). 0 means no limit."),
    (("--algorithm",), "algorithm", {"choices": DIFFUSION_ALGORITHMS},
     "Diffusion LMs (LLaDA): generation algorithm for requests that name none (generation_algorithm)."),
    (("--batch-size",), "batch_size", {"type": int, "metavar": "B"},
     "Diffusion LMs: most sequences denoised per model forward."),
    (("--max-wait-time",), "max_wait_time", {"type": float, "metavar": "SECONDS"},
     "Diffusion LMs: how long an idle server waits for a batch to fill before starting it (besides, "
     "requests arriving within 3 ms of each other always start as one batch)."),
    (("--dcp-path",), "dcp_path", {"type": Path, "metavar": "DIR"},
     "Load the weights from this torch.distributed.checkpoint folder (in memory) onto --base-model."),
    (("--base-model",), "base_model", {"metavar": "M"},
     "With --dcp-path: the model (HF id or folder) whose config and tokenizer the checkpoint fits; "
     "stands for --model."),
]


def config_default(dest: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(ServeConfig)}[dest]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def env_names(dest: str) -> tuple[str, ...]:
    return ENV_ALIASES.get(dest, ())


def _serve_help(dest: str, text: str) -> str:
    default = config_default(dest)
    shown = "none" if default in (None, []) else default
    return f"{text} [env: {', '.join(env_names(dest))}; default: {shown}]".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinkerbell",
        description="Self-hosted server for the Tinker training API, an OpenAI-compatible API and a console.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server", description="Run the Tinkerbell server. "
                           "Every flag falls back to its environment variable, then to its default.")
    for flags, dest, kwargs, text in SERVE_FLAGS:
        kw = {"default": None, **kwargs}
        serve.add_argument(*flags, dest=dest, help=_serve_help(dest, text), **kw)

    keys = sub.add_parser("keys", help="create and list API keys", description="Manage the API keys stored in "
                          "`<data-dir>/tinkerbell.db` (hashed at rest).")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    data_dir_help = (f"Server data directory [env: {', '.join(env_names('data_dir'))}; "
                     f"default: {config_default('data_dir')}]")
    create = keys_sub.add_parser("create", help="mint a new tml-... key and print it once")
    create.add_argument("--data-dir", type=Path, metavar="DIR", help=data_dir_help)
    create.add_argument("--tenant", metavar="NAME", help="Tenant the key belongs to (default: a new tenant).")
    lst = keys_sub.add_parser("list", help="list stored keys (never the secrets)")
    lst.add_argument("--data-dir", type=Path, metavar="DIR", help=data_dir_help)

    from tinkerbell.router.cli import add_parser as add_router_parser

    add_router_parser(sub)

    from tinkerbell.bench.cli import add_parser as add_bench_parser  # argparse only; the scenarios load lazily

    add_bench_parser(sub)

    for name, what in NOT_YET.items():
        sub.add_parser(name, help=f"{what} (not available in this build yet)",
                       description=f"{what}. Not available in this build yet.")
    return parser


def config_from_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> ServeConfig:
    """The validated ServeConfig for `serve` arguments (with or without the leading `serve`): flags, then
    environment (`environ`, default os.environ), then defaults. Raises ConfigError; argparse errors exit 2."""
    argv = list(argv)
    if not argv or argv[0] != "serve":
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    return _config(args, os.environ if environ is None else environ)


def _config(args: argparse.Namespace, environ: Mapping[str, str]) -> ServeConfig:
    values: dict[str, Any] = dict(from_env(dict(environ)))
    for _, dest, _, _ in SERVE_FLAGS:
        v = getattr(args, dest)
        if v is not None:
            values[dest] = v
    for k in values.get("api_keys", []):
        if not k.startswith("tml-"):
            # Name where the key came from; the tinker SDK refuses keys without the prefix client-side.
            source = "--api-key" if args.api_keys else " / ".join(env_names("api_keys"))
            raise ConfigError(f"{source}: API keys must start with 'tml-' (got {k[:8]}...)")
    return ServeConfig(**values).validate()


def _serve(args: argparse.Namespace) -> int:
    try:
        config = _config(args, os.environ)
    except ConfigError as e:
        return _fail("serve", str(e))
    from tinkerbell.legacy_env import notice

    if (line := notice(os.environ)) is not None:
        log.info(line)
    resolve_default_model(config, log)
    from tinkerbell.router import ports, supervisor

    try:
        check_tp(config, supervisor.visible_gpus(dict(os.environ)))
        if config.dp > 1:
            return supervisor.serve_dp(config)
        if ports.in_use(config.host, config.port):
            raise ConfigError(ports.busy_message(config.host, config.port, "choose another with --port (or "
                                                 "TINKERBELL_PORT)"))
    except ConfigError as e:
        return _fail("serve", str(e))
    app = _lazy_import("tinkerbell.api.app")  # FastAPI, torch and the engine: only once the config is good
    if app is None:
        return _fail("serve", "the API server (tinkerbell.api.app) is not part of this build", code=1)
    try:
        app.serve(config)
    except ConfigError as e:
        return _fail("serve", str(e))
    return 0


def _lazy_import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir is not None:
        return args.data_dir
    v = env_value("data_dir")
    return Path(v) if v is not None else config_default("data_dir")


def _keys(args: argparse.Namespace) -> int:
    auth = _lazy_import("tinkerbell.service.auth")
    if auth is None:
        return _fail("keys", "key storage (tinkerbell.service.auth) is not part of this build", code=1)
    data_dir = _data_dir(args)
    if args.keys_command == "create":
        key = auth.create_key(data_dir, args.tenant)
        print(key)
        return 0
    rows = auth.list_keys(data_dir)
    if not rows:
        print(f"no API keys in {data_dir}")
        return 0
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    table = [cols] + [["" if r.get(c) is None else str(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _router(args: argparse.Namespace) -> int:
    from tinkerbell.router.cli import main as router_main

    try:
        router_main(args)
    except ConfigError as e:
        return _fail("router", str(e))
    return 0


def _fail(command: str, message: str, code: int = 2) -> int:
    print(f"tinkerbell {command}: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    parser = build_parser()
    # Known-args parsing lets the reserved subcommands answer "not available" whatever flags they are given.
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if extra and args.command not in NOT_YET:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(args)
    if args.command == "keys":
        return _keys(args)
    if args.command == "router":
        return _router(args)
    if args.command == "bench":
        from tinkerbell.bench.cli import main as bench_main

        return bench_main(args, sys.argv[1:] if argv is None else list(argv))
    return _fail(args.command, "not available in this build yet")


if __name__ == "__main__":
    sys.exit(main())
