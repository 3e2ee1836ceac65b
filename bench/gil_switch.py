#!/usr/bin/env python
"""A/B of the API process's GIL switch interval: one replica, the same HTTP load, CPython's default 5 ms vs
shorter ones (TINKERBELL_GIL_SWITCH_INTERVAL, tinkerbell/api/app.py), in one run on one GPU.

The engine thread and the event loop share the GIL; the question is how much of the gap between the engine's
own throughput and what HTTP clients get is the engine thread waiting for the GIL.

    python3 bench/gil_switch.py                      # GPU: random-weight Llama-3.2-1B, 256 clients
    python3 bench/gil_switch.py --quick --device cpu # smoke run (figures mean nothing)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.dp_scaling import prepare_model, run_load, workloads  # noqa: E402
from tinkerbell.bench.server import ServerLauncher  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--model")
    ap.add_argument("--shape", default="Llama-3.2-1B")
    ap.add_argument("--checkpoint-dir", default="/tmp/dp-scaling-llama-3.2-1b-random")
    ap.add_argument("--intervals", default="0.005,0.0005", help="seconds, comma-separated")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    work = Path(tempfile.mkdtemp(prefix="gil-switch-"))
    model = prepare_model(args, work)
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    extra = ["--dtype", "bfloat16", "--gpu-memory-util", "0.5"] if args.device == "cuda" else []
    wls = [w for w in workloads(args.quick) if w.name in ("decode-stream", "decode-batch")]
    rows: list[tuple[str, str, dict]] = []
    with mp.get_context("spawn").Pool(2 if args.quick else 4) as pool:
        for interval in args.intervals.split(","):
            os.environ["TINKERBELL_GIL_SWITCH_INTERVAL"] = interval
            launcher = ServerLauncher(str(model), work, extra=extra)
            server = launcher.start(name=f"switch-{interval}")
            try:
                server.wait_healthy()
                for w in wls:
                    run_load(pool, 2, server.url, launcher.api_key, str(model), w, vocab, seed=7)  # warm-up
                    res = run_load(pool, 2 if args.quick else 4, server.url, launcher.api_key, str(model), w, vocab,
                                   seed=1)
                    print(f"[{time.strftime('%H:%M:%S')}] switch {interval} s  {w.name:14s} "
                          f"{res['output_tok_s']:9.1f} out tok/s  ok {res['ok']}/{res['requests']}", flush=True)
                    rows.append((interval, w.name, res))
            finally:
                server.stop()
    print(f"\n| workload | " + " | ".join(f"switch {i} s: out tok/s" for i in args.intervals.split(",")) + " |")
    print("|---|" + "---|" * len(args.intervals.split(",")))
    for w in wls:
        cells = [f"{r['output_tok_s']:,.0f} (ok {r['ok']}/{r['requests']})" for _, n, r in rows if n == w.name]
        print(f"| {w.name}: {w.prompt_len} in / {w.max_tokens} out, {w.concurrency} clients | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps([{"interval": i, "workload": n, **r} for i, n, r in rows], indent=1))
    return 0 if all(r["ok"] == r["requests"] for _, _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
