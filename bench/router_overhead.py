#!/usr/bin/env python
"""Latency the router adds: the same requests straight to a replica and through the router, interleaved in one
run, on loopback. Starts `tinkerbell serve --dp 2` on a tiny random-weight llama (CPU is fine) unless --router
and --replica point at a running cluster.

    python bench/router_overhead.py [--n 500] [--router URL --replica URL] [--api-key KEY]

Prints p50/p90 per request kind, direct vs routed, and the added p50 (docs/router.md records a run).

    python bench/router_overhead.py --concurrency 256 [--duration 10] [--step-ms 10] [--batch 128]

Throughput under load instead: fast fake replicas (asyncio servers whose fake engine emits one SSE event per
step per request) and `tinkerbell router` over one and over two of them; `--concurrency` keep-alive clients send
128-token completions, streamed and not, straight to a replica and through each router. Prints req/s and SSE
events/s per path and the ratio to direct; exits 1 if any answer was malformed."""

from __future__ import annotations

import argparse
import asyncio
import json
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


# ---------------------------------------------------------------------------------------------- --concurrency
# A fast fake replica and a lean load generator, so that the router (not a CPU model) is what the numbers show.

FAKE_TEXT = b'{"id":"cmpl-0","object":"text_completion","model":"fake","choices":[{"index":0,"text":"' + b"x" * 400 + \
    b'","finish_reason":"length"}],"usage":{"prompt_tokens":128,"completion_tokens":128,"total_tokens":256}}'
SSE_EVENT = b'data: {"id":"cmpl-0","object":"text_completion","choices":[{"index":0,"text":" tok"}]}\n\n'


class FakeReplica(asyncio.Protocol):
    """One connection of a fake replica: /stats and /healthz answer at once; POST /v1/completions takes
    `tokens` engine steps of `step` seconds (one SSE event per step when streamed, chunked like uvicorn's
    StreamingResponse; else one Content-Length JSON at the end). At most `batch` requests are generated at
    once per replica, the rest wait, like an engine's batch limit: the replica, not the concurrency, is the
    bottleneck, so two replicas can serve twice one."""

    engine: "FakeEngine"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            n = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    n = int(v)
            if len(self.buf) < end + 4 + n:
                return
            body = self.buf[end + 4:end + 4 + n]
            self.buf = self.buf[end + 4 + n:]
            self.handle(head.split(" ", 2)[1], body)

    def handle(self, path: str, body: bytes) -> None:
        if path in ("/stats", "/healthz", "/api/v1/healthz"):
            data = json.dumps({"status": "ok", "model": "fake", "outstanding": len(self.engine.active),
                               "uptime_seconds": time.monotonic() - self.engine.t0}).encode()
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(data), data))
        elif path == "/v1/completions":
            self.engine.submit(self, b'"stream": true' in body or b'"stream":true' in body)
        else:
            self.t.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")


class FakeEngine:
    def __init__(self, step: float, tokens: int, batch: int):
        self.step, self.tokens, self.batch, self.t0 = step, tokens, batch, time.monotonic()
        self.active: list[list] = []  # [connection, streamed, steps left]
        self.waiting: list[tuple[FakeReplica, bool]] = []

    def submit(self, conn: FakeReplica, stream: bool) -> None:
        self.waiting.append((conn, stream))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.step)
            while self.waiting and len(self.active) < self.batch:
                conn, stream = self.waiting.pop(0)
                if stream:
                    conn.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                self.active.append([conn, stream, self.tokens])
            keep = []
            for item in self.active:
                conn, stream, left = item
                item[2] = left = left - 1
                if conn.t.is_closing():
                    continue
                if stream:
                    ev = SSE_EVENT if left else SSE_EVENT + b"data: [DONE]\n\n"
                    conn.t.write(b"%x\r\n%s\r\n" % (len(ev), ev) + (b"0\r\n\r\n" if not left else b""))
                elif not left:
                    conn.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                                 % len(FAKE_TEXT) + FAKE_TEXT)
                if left:
                    keep.append(item)
            self.active = keep


def fake_replica_main(port: int, step: float, tokens: int, batch: int) -> None:
    async def main() -> None:
        engine = FakeEngine(step, tokens, batch)
        FakeReplica.engine = engine
        loop = asyncio.get_running_loop()
        await loop.create_server(FakeReplica, "127.0.0.1", port, backlog=4096)
        await engine.run()

    asyncio.run(main())


async def _load_worker(host: str, port: int, body: bytes, stream: bool, window: tuple[float, float],
                       counts: list[int]) -> None:
    """One keep-alive client: POST /v1/completions again and again; counts the requests that end and the SSE
    events that arrive inside `window` (counts[0], counts[1]), and malformed answers (counts[2])."""
    reader, writer = await asyncio.open_connection(host, port)
    req = (b"POST /v1/completions HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
           b"content-length: %d\r\n\r\n%s" % (host.encode(), port, len(body), body))
    t0, t1 = window
    try:
        while True:
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                counts[2] += 1
                return
            h = head.lower()
            if b"transfer-encoding: chunked" in h:
                tail = b""
                while True:
                    size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                    data = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    if t0 <= time.monotonic() < t1:
                        counts[1] += data.count(b"\n\n")
                    tail = (tail + data[:-2])[-16:]
                if stream and not tail.endswith(b"[DONE]\n\n"):
                    counts[2] += 1
            else:
                i = h.index(b"content-length:") + 15
                await reader.readexactly(int(h[i:h.index(b"\r\n", i)]))
            if t0 <= time.monotonic() < t1:
                counts[0] += 1
    finally:
        writer.close()


def load_proc(url: str, conc: int, stream: bool, start_at: float, warmup: float, duration: float) -> list[int]:
    host, port = url.split("//")[1].split(":")
    body = json.dumps({"model": "fake", "prompt": [1] * 128, "max_tokens": 128, "stream": stream}).encode()
    window = (start_at + warmup, start_at + warmup + duration)

    async def main() -> list[int]:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        counts = [0, 0, 0]
        tasks = [asyncio.create_task(_load_worker(host, int(port), body, stream, window, counts))
                 for _ in range(conc)]
        await asyncio.wait(tasks, timeout=window[1] - time.monotonic())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return counts

    return asyncio.run(main())


def run_concurrency(args: argparse.Namespace) -> int:
    """Direct vs via the router (1 and 2 fake replicas), streamed and not, at --concurrency clients."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    step = args.step_ms / 1000
    base = _free_block(4)
    fakes = [ctx.Process(target=fake_replica_main, args=(base + i, step, args.tokens, args.batch), daemon=True)
             for i in range(2)]
    for f in fakes:
        f.start()
    reps = [f"http://127.0.0.1:{base + i}" for i in range(2)]
    routers = []
    rows = []
    try:
        for i, n in ((2, 1), (3, 2)):
            log = open(Path(tempfile.gettempdir()) / f"router-bench-{n}.log", "wb")
            cmd = [sys.executable, "-m", "tinkerbell", "router", "--host", "127.0.0.1", "--port", str(base + i)]
            for u in reps[:n]:
                cmd += ["--replica", u]
            routers.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        for i in (2, 3):
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{base + i}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    sys.exit("the router did not start; see router-bench-*.log in the temp dir")
                time.sleep(0.2)
        targets = [("1 replica direct", reps[0]), ("1 replica via router", f"http://127.0.0.1:{base + 2}"),
                   ("2 replicas via router", f"http://127.0.0.1:{base + 3}")]
        procs = max(1, args.client_procs)
        with ctx.Pool(procs) as pool:
            for stream in (False, True):
                for label, url in targets:
                    start_at = time.monotonic() + 0.5
                    share = [args.concurrency // procs + (1 if j < args.concurrency % procs else 0)
                             for j in range(procs)]
                    parts = pool.starmap(load_proc, [(url, c, stream, start_at, args.warmup, args.duration)
                                                      for c in share])
                    reqs, events, bad = (sum(p[k] for p in parts) for k in range(3))
                    rows.append((("streamed" if stream else "not streamed"), label, reqs / args.duration,
                                 events / args.duration, bad))
                    print(f"{rows[-1][0]:13s} {label:22s} {rows[-1][2]:8.1f} req/s {rows[-1][3]:9.0f} events/s"
                          f"  bad {bad}", flush=True)
    finally:
        for r in routers:
            r.send_signal(signal.SIGTERM)
        for r in routers:
            r.wait(timeout=30)
        for f in fakes:
            f.kill()
    print(f"\n| load ({args.concurrency} clients, {args.tokens} tokens, step {args.step_ms} ms, batch {args.batch}) "
          "| path | req/s | SSE events/s | vs direct |\n|---|---|---|---|---|")
    for kind, label, rps, eps, bad in rows:
        direct = next(r[2] for r in rows if r[0] == kind and r[1] == "1 replica direct")
        print(f"| {kind} | {label} | {rps:.1f} | {eps:.0f} | {rps / direct:.2f}x |")
    return 1 if any(r[4] for r in rows) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="requests per kind and path")
    ap.add_argument("--router", help="router URL of a running cluster")
    ap.add_argument("--replica", help="one of its replicas' URL")
    ap.add_argument("--model", help="model name for the completion requests (default: the served one)")
    ap.add_argument("--api-key", default=KEY)
    ap.add_argument("--concurrency", type=int, default=0,
                    help="throughput mode: this many concurrent clients against fast fake replicas, direct vs via "
                         "the router (1 and 2 replicas), streamed and not")
    ap.add_argument("--duration", type=float, default=8.0, help="--concurrency: seconds per measurement")
    ap.add_argument("--warmup", type=float, default=3.0, help="--concurrency: seconds before counting starts")
    ap.add_argument("--tokens", type=int, default=128, help="--concurrency: tokens (SSE events) per request")
    ap.add_argument("--step-ms", type=float, default=10.0, help="--concurrency: the fake engine's step time")
    ap.add_argument("--batch", type=int, default=128, help="--concurrency: requests a fake replica runs at once")
    ap.add_argument("--client-procs", type=int, default=2, help="--concurrency: load generator processes")
    args = ap.parse_args()
    if args.concurrency:
        return run_concurrency(args)
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
