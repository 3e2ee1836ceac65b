"""Micro-benchmark of the OpenAI face's streaming path: C concurrent streamed /v1/completions against a served
model, output tokens/s as the client receives them, and the same requests non-streamed.

Besides tokens/s it reads the server's CPU time per thread from /proc (Linux): the main thread runs the
event loop (HTTP, SSE, detokenisation), the others the engine. On a small CPU the engine's own per-step
Python often limits tokens/s, so "loop CPU ms per 1k tokens" is the figure that isolates the API path; on a
GPU the engine is fast enough that tokens/s shows the API's limit directly. Each source tree given is served in
turn by its own `tinkerbell serve` subprocess (the code under test), alternating for `--rounds`, so a
before/after comparison runs on the same machine in the same run:

    mkdir -p /tmp/before && git archive OLD_COMMIT tinkerbell | tar -x -C /tmp/before
    python -m tinkerbell.bench.stream_speed --tree /tmp/before --tree . --rounds 2

Every streamed completion is checked against the server's non-streamed text for the same seed, so a faster
stream cannot be a wrong one. They must be equal on a CPU; on a GPU a batch of another size can flip a sampled
token now and then (float rounding), so the command fails only when more than a tenth of them differ (a lost
or duplicated chunk would make nearly all differ). The server runs in float32 unless --dtype says otherwise.
The client is plain httpx with one `json.loads` per SSE event, kept light so that it measures the server
rather than itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class Figures:
    tree: str
    mode: str  # streamed | plain
    tok_s: float
    chunks_per_request: float
    wall_s: float
    mismatches: int
    loop_cpu_ms_per_1k: float  # the server's main thread (event loop) CPU time per 1,000 output tokens
    other_cpu_ms_per_1k: float  # every other thread of the server (the engine, torch's workers)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tinkerbell serve` of one source tree, on a free loopback port, without auth."""

    def __init__(self, tree: Path, model: Path, work: Path, dtype: str = "float32"):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = Path(tempfile.mkdtemp(dir=work))
        env = dict(os.environ, PYTHONPATH=str(tree.resolve()), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))  # a tiny model gains nothing from more
        self.log = open(data / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tinkerbell", "serve", "--model", str(model), "--host", "127.0.0.1", "--port",
             str(self.port), "--data-dir", str(data), "--no-auth", "--dtype", dtype],
            cwd=str(tree), env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server of {tree} exited; see {data / 'server.log'}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server of {tree} did not start in 180 s")

    def cpu(self) -> tuple[float, float]:
        """(main thread, all other threads) CPU seconds so far, from /proc; (nan, nan) where unavailable."""
        try:
            tick = os.sysconf("SC_CLK_TCK")
            main = other = 0.0
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                secs = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
                if task.name == str(self.proc.pid):
                    main += secs
                else:
                    other += secs
            return main, other
        except (OSError, ValueError, IndexError):
            return float("nan"), float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


async def _one(client: httpx.AsyncClient, model: str, prompt: list[int], out: int, seed: int,
               stream: bool) -> tuple[str, int, int]:
    """(text, completion tokens, SSE events with text) of one request."""
    body = {"model": model, "prompt": prompt, "max_tokens": out, "temperature": 1.0, "seed": seed,
            "ignore_eos": True, "stream": stream}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        d = r.json()
        return d["choices"][0]["text"], d["usage"]["completion_tokens"], 0
    body["stream_options"] = {"include_usage": True}
    parts, tokens, chunks = [], 0, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("choices") and d["choices"][0]["text"]:
                parts.append(d["choices"][0]["text"])
                chunks += 1
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
    return "".join(parts), tokens, chunks


async def _load(url: str, model: str, prompts: list[list[int]], out: int, conc: int,
                stream: bool) -> tuple[list[tuple[str, int, int]], float]:
    sem = asyncio.Semaphore(conc)
    limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=conc + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def guarded(i: int, p: list[int]) -> tuple[str, int, int]:
            async with sem:
                return await _one(client, model, p, out, 1000 + i, stream)

        t0 = time.perf_counter()
        got = await asyncio.gather(*(guarded(i, p) for i, p in enumerate(prompts)))
        return list(got), time.perf_counter() - t0


def measure(tree: Path, model: Path, work: Path, requests: int, conc: int, in_len: int,
            out: int, dtype: str = "float32") -> list[Figures]:
    import random

    rng = random.Random(0)
    info_vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = [[rng.randint(16, info_vocab - 1) for _ in range(in_len)] for _ in range(requests)]
    server = Server(tree, model, work, dtype)
    try:
        name = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(_load(server.url, name, prompts[:8], 8, 8, True))  # warm-up
        c0 = server.cpu()
        streamed, ws = asyncio.run(_load(server.url, name, prompts, out, conc, True))
        c1 = server.cpu()
        plain, wp = asyncio.run(_load(server.url, name, prompts, out, conc, False))
        c2 = server.cpu()
    finally:
        server.stop()
    bad = sum(a[0] != b[0] for a, b in zip(streamed, plain))
    ts, tp = sum(t for _, t, _ in streamed), sum(t for _, t, _ in plain)
    return [Figures(str(tree), "streamed", ts / ws, sum(c for _, _, c in streamed) / requests, ws, bad,
                    1e6 * (c1[0] - c0[0]) / ts, 1e6 * (c1[1] - c0[1]) / ts),
            Figures(str(tree), "plain", tp / wp, 0.0, wp, 0, 1e6 * (c2[0] - c1[0]) / tp, 1e6 * (c2[1] - c1[1]) / tp)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", type=Path, help="source tree to serve (repeatable) [default: .]")
    ap.add_argument("--model", type=Path, help="model folder [default: the tiny demo model, built in a temp dir]")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--in-len", type=int, default=16)
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1, help="alternate the trees this many times")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    args = ap.parse_args(argv)
    trees = args.tree or [Path(".")]
    work = Path(tempfile.mkdtemp(prefix="stream-speed-"))
    model = args.model
    if model is None:
        from tinkerbell.engine.models.tiny import build_tiny_model

        model = build_tiny_model(work / "tiny")
    rows: list[Figures] = []
    for _ in range(args.rounds):
        for tree in trees:
            rows += measure(tree, model, work, args.requests, args.concurrency, args.in_len, args.out_len,
                            args.dtype)
            print(f"  {rows[-2].tree}: streamed {rows[-2].tok_s:,.0f} tok/s, plain {rows[-1].tok_s:,.0f} tok/s",
                  flush=True)
    print(f"\n{args.requests} requests, {args.in_len} in / {args.out_len} out, concurrency {args.concurrency}, "
          f"model {model}")
    print("| tree | mode | output tok/s | loop CPU ms / 1k tok | engine CPU ms / 1k tok | text chunks / request "
          "| wall s | streamed != plain |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.tree} | {r.mode} | {r.tok_s:,.0f} | {r.loop_cpu_ms_per_1k:.0f} | {r.other_cpu_ms_per_1k:.0f} | "
              f"{r.chunks_per_request:.1f} | {r.wall_s:.2f} | {r.mismatches if r.mode == 'streamed' else '—'} |")
    return 1 if any(r.mismatches > 0.1 * args.requests for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
