"""`tinkerbell bench` flags and entry point (tinkerbell/cli.py delegates here). This module imports only the
standard library at load time: `tinkerbell --help` must stay fast."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

SCENARIO_NAMES = ("sampling", "concurrency", "mixed", "lora", "training", "scaling")


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _scenarios(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in SCENARIO_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {', '.join(bad) or text!r}; choose from "
                                         f"{', '.join(SCENARIO_NAMES)}")
    return names


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmark a server and write a report with plots",
                       description="Benchmark a running server (--url) or one it starts (--model) over HTTP with "
                       "the openai client and the tinker SDK; writes report.md, PNG plots and results.json "
                       "(docs/bench.md). `tinkerbell bench compare A.json B.json` diffs two runs.")
    p.add_argument("--url", metavar="URL", help="A running server or router to benchmark.")
    p.add_argument("--api-key", metavar="KEY", help="API key for --url [default: $TINKER_API_KEY, else "
                   "<data-dir>/first-api-key, else tml-local for a --no-auth server].")
    p.add_argument("--model", metavar="M", help="Without --url: start `tinkerbell serve --model M` for the run and "
                   "stop it after. With --url: the served model's local folder or HF id, for the peer baseline "
                   "and the roofline.")
    p.add_argument("--tp", type=int, default=1, metavar="T", help="With --model: tensor-parallel size of the server.")
    p.add_argument("--dp", type=int, default=1, metavar="D", help="With --model: data-parallel replicas.")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), help="With --model: serve dtype.")
    p.add_argument("--gpu-memory-util", type=float, metavar="F", help="With --model: the server's KV-cache share.")
    p.add_argument("--max-loras", type=int, metavar="N", help="With --model: LoRA slots [default: the lora "
                   "scenario's largest adapter count].")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="With --model: one more argument for `tinkerbell serve` (repeatable), e.g. "
                   "--serve-arg=--max-queued-requests --serve-arg=0.")
    p.add_argument("--scenarios", type=_scenarios, default=SCENARIO_NAMES, metavar="LIST",
                   help=f"Comma-separated, from {','.join(SCENARIO_NAMES)} [default: all].")
    p.add_argument("--quick", action="store_true", help="Small workloads: a minute or two on a CPU with a tiny model "
                   "(what the tests run).")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="Run the HF transformers / PEFT peer in this process on the same model folder, for the "
                   "ours/peer columns [default: on].")
    p.add_argument("--scaling-dp", type=_ints, metavar="LIST", help="DP sizes for the scaling scenario [default: "
                   "1,2 with --quick, else 1,2,4,8 up to the visible GPUs].")
    p.add_argument("--out", type=Path, metavar="DIR", help="Report folder [default: <data-dir>/bench/<timestamp>/].")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="Server data directory, for the default --out and "
                   "the first API key [env: TINKERBELL_DATA_DIR; default: data].")
    p.add_argument("--no-progress", action="store_true", help="No progress bars (log lines only).")
    p.add_argument("compare", nargs="*", metavar="compare A.json B.json",
                   help="Print a diff table of two results.json files (or report folders) instead of running.")
    return p


def _command_line(argv: list[str]) -> str:
    shown, hide = [], False
    for a in argv:
        shown.append("***" if hide else a)
        hide = a == "--api-key"
    return " ".join(["tinkerbell", *shown])


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    if args.compare:
        if args.compare[0] != "compare" or len(args.compare) != 3:
            print("tinkerbell bench: error: usage: tinkerbell bench compare A.json B.json", file=sys.stderr)
            return 2
        from tinkerbell.bench.compare import CompareError
        from tinkerbell.bench.compare import main as compare_main

        try:
            return compare_main(args.compare[1], args.compare[2])
        except CompareError as e:
            print(f"tinkerbell bench compare: error: {e}", file=sys.stderr)
            return 2
    if not args.url and not args.model:
        print("tinkerbell bench: error: give --url URL (a running server) or --model M (bench starts one)",
              file=sys.stderr)
        return 2
    if args.tp < 1 or args.dp < 1:
        print("tinkerbell bench: error: --tp and --dp must be >= 1", file=sys.stderr)
        return 2
    from tinkerbell.bench.runner import BenchConfig, run

    for name in ("httpx", "httpx2", "tinker"):  # a line per request otherwise, burying the progress
        logging.getLogger(name).setLevel(logging.WARNING)

    serve_args: list[str] = list(args.serve_arg)
    for flag, value in (("--dtype", args.dtype), ("--gpu-memory-util", args.gpu_memory_util),
                        ("--max-loras", args.max_loras)):
        if value is not None:
            serve_args += [flag, str(value)]
    data_dir = args.data_dir or Path(os.environ.get("TINKERBELL_DATA_DIR") or "data")
    cfg = BenchConfig(url=args.url, api_key=args.api_key, model=args.model, tp=args.tp, dp=args.dp,
                      serve_args=serve_args, scenarios=args.scenarios, quick=args.quick, out=args.out,
                      data_dir=data_dir, peer=args.peer, progress=not args.no_progress, scaling_dp=args.scaling_dp,
                      command=_command_line(argv if argv is not None else sys.argv[1:]))
    try:
        result, out_dir = run(cfg)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"tinkerbell bench: error: {e}", file=sys.stderr)
        return 1
    failed = [s.name for s in result.scenarios if s.status == "failed"]
    print(f"report: {out_dir / 'report.md'}")
    print(f"results: {out_dir / 'results.json'}")
    for s in result.scenarios:
        print(f"  {s.name:<12} {s.status:<8} {s.seconds:6.1f}s {s.reason}")
    return 1 if failed else 0


def run_from(argv: list[str]) -> Any:
    """Parse and run `bench` arguments alone (tests and scripts): the exit status."""
    parser = argparse.ArgumentParser(prog="tinkerbell")
    add_parser(parser.add_subparsers(dest="command"))
    return main(parser.parse_args(["bench", *argv]), ["bench", *argv])
