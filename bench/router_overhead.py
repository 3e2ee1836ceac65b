#!/usr/bin/env python
"""Latency the router adds: the same requests straight to a replica and through the router, interleaved in one
run, on loopback. Starts `tinkerbell serve --dp 2` on a tiny random-weight llama (CPU is fine) unless --router
and --replica point at a running cluster.

    python bench/router_overhead.py [--n 500] [--router URL --replica URL] [--api-key KEY]

Prints p50/p90 per request kind, direct vs routed, and the added p50 (docs/router.md records a run)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

KEY = "tml-bench-router"


def _free_block(n: int) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        try:
            socks = [socket.socket() for _ in range(n)]
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


def start_cluster(root: Path) -> tuple[subprocess.Popen, str, str, Path]:
    from tinkerbell.engine.models.tiny import build_tiny_model

    model = root / "tiny-llama"
    build_tiny_model(model, arch="llama")
    port = _free_block(3)
    log = root / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "tinkerbell", "serve", "--dp", "2", "--host", "127.0.0.1",
                             "--port", str(port), "--data-dir", str(root / "data"), "--api-key", KEY,
                             "--model", str(model)], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.monotonic() + 180
    while "Ctrl+C stops all" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"serve --dp 2 did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}", model


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(client: httpx.Client, base: str, kind: str, model: str) -> float:
    t = time.perf_counter()
    if kind == "healthz":
        r = client.get(base + "/api/v1/healthz")
    elif kind == "session":
        r = client.post(base + "/api/v1/create_session", json={"tags": [], "user_metadata": {},
                                                               "sdk_version": "0.38.0", "type": "create_session"})
    else:
        r = client.post(base + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1})
    r.raise_for_status()
    return (time.perf_counter() - t) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="requests per kind and path")
    ap.add_argument("--router", help="router URL of a running cluster")
    ap.add_argument("--replica", help="one of its replicas' URL")
    ap.add_argument("--model", help="model name for the completion requests (default: the served one)")
    ap.add_argument("--api-key", default=KEY)
    args = ap.parse_args()
    proc = None
    tmp = tempfile.TemporaryDirectory()
    if args.router and args.replica:
        router, replica, model = args.router, args.replica, args.model
    else:
        proc, router, replica, model_path = start_cluster(Path(tmp.name))
        model = args.model or str(model_path)
    if model is None:
        model = httpx.get(router + "/v1/models", headers={"X-API-Key": args.api_key}).json()["data"][0]["id"]
    try:
        headers = {"X-API-Key": args.api_key}
        with httpx.Client(headers=headers, timeout=60, trust_env=False) as direct, \
                httpx.Client(headers=headers, timeout=60, trust_env=False) as routed:
            for kind in ("healthz", "session", "completion"):
                for _ in range(20):  # warm connections and caches
                    measure(direct, replica, kind, model)
                    measure(routed, router, kind, model)
                d: list[float] = []
                r: list[float] = []
                for _ in range(args.n):  # interleaved: both paths see the same machine state
                    d.append(measure(direct, replica, kind, model))
                    r.append(measure(routed, router, kind, model))
                print(f"{kind:10s} direct p50 {pct(d, .5):6.2f} ms p90 {pct(d, .9):6.2f} | via router p50 "
                      f"{pct(r, .5):6.2f} ms p90 {pct(r, .9):6.2f} | added p50 {pct(r, .5) - pct(d, .5):5.2f} ms "
                      f"(median of differences {statistics.median(b - a for a, b in zip(d, r)):5.2f} ms)")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
