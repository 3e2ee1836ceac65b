#!/usr/bin/env python
"""Data parallelism on ONE GPU (issue 6): output tok/s of one replica alone, the same replica behind the router,
and two replicas sharing the GPU behind the router, under the same OpenAI load; plus the router's added latency.

    python bench/dp_scaling.py [--out DIR]                   # an H100: ~5 min, random-weight Llama-3.2-1B
    python bench/dp_scaling.py --quick --device cpu          # anywhere: tiny model, tiny loads (a smoke run)

Why two replicas on one GPU can help, and when they cannot: a replica is one API process (Python, asyncio) in
front of its engine. At high concurrency with short requests, that process (HTTP, JSON, SSE framing,
detokenising) saturates a CPU core long before the GPU is busy, so a second process (a second replica) adds
host capacity and output tok/s rises towards 2x. When the GPU is the bottleneck (the *prefill-heavy* workload
here: long prompts, few output tokens, non-streamed, so the host does little per GPU-second) two processes only
time-share the same GPU and cannot exceed ~1x. Issue 6's ">= 1.8x where the GPU is the bottleneck" needs a
second GPU; this script measures both sides on one.

Workloads (full mode; --quick shrinks them):
  decode-stream   128 in / 128 out, 256 concurrent clients, streamed (SSE)     - host-bound
  decode-batch    128 in / 128 out, 256 concurrent clients, not streamed         - host-bound, less so
  prefill-heavy   2048 in / 16 out, 64 concurrent clients, not streamed          - GPU-bound
Each is run against: A) `serve --dp 1` directly, B) the same replica behind `tinkerbell router`, C) `serve --dp 2`
(both replicas on the same GPU, --gpu-memory-util split). Prompts are random token ids (a fresh seed per run, so
no run reuses another's cached prefixes); `ignore_eos` makes every request produce exactly max_tokens, and the
script checks it did (usage.completion_tokens), that every request succeeded, that greedy outputs are identical
direct and through the router, and that both dp-2 replicas served. Clients run in several processes so the load
generator is not what limits the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinkerbell.bench.server import RunningServer, ServerLauncher, free_port_block  # noqa: E402
from tinkerbell.router.supervisor import spawn  # noqa: E402

FIRST_ID = 16  # low ids are special tokens


@dataclass
class Workload:
    name: str
    prompt_len: int
    max_tokens: int
    requests: int
    concurrency: int
    stream: bool
    bound: str  # what limits it, as the design predicts


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [Workload("decode-stream", 16, 16, 24, 8, True, "host"),
                Workload("decode-batch", 16, 16, 24, 8, False, "host"),
                Workload("prefill-heavy", 192, 2, 12, 4, False, "GPU")]
    return [Workload("decode-stream", 128, 128, 512, 256, True, "host"),
            Workload("decode-batch", 128, 128, 512, 256, False, "host"),
            Workload("prefill-heavy", 2048, 16, 128, 64, False, "GPU")]


# ---------------------------------------------------------------------------------------------- load driver


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_ID, vocab) for _ in range(length)] for _ in range(n)]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], w: Workload) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": w.max_tokens, "temperature": 1.0,
                            "ignore_eos": True}
    t0 = time.monotonic()
    rec: dict[str, Any] = {"start": t0, "ok": False, "tokens": 0, "ttft": None, "end": t0, "error": ""}
    try:
        if w.stream:
            body.update(stream=True, stream_options={"include_usage": True})
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    return rec
                done = False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        continue
                    ev = json.loads(data)
                    if rec["ttft"] is None and ev.get("choices") and ev["choices"][0].get("text"):
                        rec["ttft"] = time.monotonic() - t0
                    if ev.get("usage"):
                        rec["tokens"] = ev["usage"]["completion_tokens"]
                if not done:
                    rec["error"] = "stream ended without [DONE]"
                    return rec
        else:
            r = await client.post(url + "/v1/completions", json=body)
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                return rec
            rec["tokens"] = r.json()["usage"]["completion_tokens"]
        rec["ok"] = rec["tokens"] == w.max_tokens
        if not rec["ok"]:
            rec["error"] = f"{rec['tokens']} completion tokens, expected {w.max_tokens}"
    except (httpx.HTTPError, ValueError, KeyError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        rec["end"] = time.monotonic()
    return rec


async def _client_proc_main(url: str, key: str, model: str, prompts: list[list[int]], w: Workload,
                            concurrency: int, start_at: float) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=600, limits=limits,
                                 trust_env=False) as client:
        await client.get(url + "/healthz")
        queue = list(reversed(prompts))
        out: list[dict[str, Any]] = []

        async def worker() -> None:
            while queue:
                out.append(await _one(client, url, model, queue.pop(), w))

        # Every client process starts at the same instant (CLOCK_MONOTONIC is system-wide on Linux).
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def _client_proc(args: tuple) -> list[dict[str, Any]]:
    return asyncio.run(_client_proc_main(*args))


def run_load(pool: Any, procs: int, url: str, key: str, model: str, w: Workload, vocab: int,
             seed: int) -> dict[str, Any]:
    """`w.requests` requests at `w.concurrency`, spread over `procs` client processes; a summary."""
    prompts = _prompts(w.requests, w.prompt_len, vocab, seed)
    procs = max(1, min(procs, w.concurrency))
    start_at = time.monotonic() + 1.0
    jobs = []
    for i in range(procs):
        share = prompts[i::procs]
        conc = w.concurrency // procs + (1 if i < w.concurrency % procs else 0)
        jobs.append((url, key, model, share, w, max(1, conc), start_at))
    recs = [r for part in pool.map(_client_proc, jobs) for r in part]
    ok = [r for r in recs if r["ok"]]
    wall = max(r["end"] for r in recs) - min(r["start"] for r in recs)
    e2e = sorted(r["end"] - r["start"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    out_tok = sum(r["tokens"] for r in ok)
    return {"requests": len(recs), "ok": len(ok), "errors": [r["error"] for r in recs if not r["ok"]][:5],
            "wall_s": round(wall, 3), "output_tok_s": round(out_tok / wall, 1),
            "total_tok_s": round((out_tok + len(ok) * w.prompt_len) / wall, 1),
            "req_s": round(len(ok) / wall, 2),
            "e2e_p50_ms": round(1000 * _pct(e2e, 0.5), 1) if e2e else None,
            "e2e_p90_ms": round(1000 * _pct(e2e, 0.9), 1) if e2e else None,
            "ttft_p50_ms": round(1000 * _pct(ttft, 0.5), 1) if ttft else None}


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---------------------------------------------------------------------------------------------- checks


def greedy(url: str, key: str, model: str, prompts: list[list[int]], n: int) -> list[str]:
    """Greedy completions, one at a time (batch 1: the same kernels on every path)."""
    out = []
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=120, trust_env=False) as c:
        for p in prompts:
            r = c.post(url + "/v1/completions", json={"model": model, "prompt": p, "max_tokens": n,
                                                      "temperature": 0.0, "ignore_eos": True})
            r.raise_for_status()
            out.append(r.json()["choices"][0].get("text", ""))
    return out


def added_latency(direct: str, routed: str, key: str, model: str, n: int) -> dict[str, Any]:
    """1-token completions, sent one at a time, alternating direct and via the router (same machine state)."""
    body = {"model": model, "prompt": [FIRST_ID + 1, FIRST_ID + 2, FIRST_ID + 3], "max_tokens": 1}
    d: list[float] = []
    r: list[float] = []
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=60, trust_env=False) as a, \
            httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=60, trust_env=False) as b:
        for i in range(n + 10):
            for client, base, acc in ((a, direct, d), (b, routed, r)):
                t = time.perf_counter()
                client.post(base + "/v1/completions", json=body).raise_for_status()
                if i >= 10:  # the first ones warm connections
                    acc.append((time.perf_counter() - t) * 1000)
    d.sort()
    r.sort()
    return {"n": n, "direct_p50_ms": round(_pct(d, .5), 2), "router_p50_ms": round(_pct(r, .5), 2),
            "added_p50_ms": round(_pct(r, .5) - _pct(d, .5), 2),
            "added_median_of_pairs_ms": round(statistics.median(y - x for x, y in zip(d, r)), 2)}


# ---------------------------------------------------------------------------------------------- servers


def prepare_model(args: argparse.Namespace, work: Path) -> Path:
    if args.model:
        return Path(args.model)
    if args.device == "cpu":
        from tinkerbell.engine.models.tiny import build_tiny_model

        return build_tiny_model(work / "tiny-llama", arch="llama")
    ckpt = Path(args.checkpoint_dir)
    if not (ckpt / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_random_checkpoint.py"), str(ckpt),
                        "--shape", args.shape], check=True)
        # Every id decodes to text, as with a real tokenizer (the demo one knows a few hundred of 128k ids).
        subprocess.run([sys.executable, "-m", "tinkerbell.bench.vocab", str(ckpt)], check=True, cwd=ROOT)
    return ckpt


def start_router(replica_url: str, work: Path, key: str) -> RunningServer:
    port = free_port_block(1)
    child = spawn("router", f"http://127.0.0.1:{port}",
                  ["router", "--host", "127.0.0.1", "--port", str(port), "--replica", replica_url],
                  work / "router-alone.log", dict(os.environ, PYTHONUNBUFFERED="1"))
    server = RunningServer(child, key)
    server.wait_healthy(60)
    return server


def served_per_replica(router_url: str) -> list[int]:
    return [w["requests_served"] for w in httpx.get(router_url + "/stats", timeout=10).json()["workers"]]


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny loads (a smoke run; figures mean little)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--model", help="a model folder to serve instead of writing a random-weight checkpoint")
    ap.add_argument("--shape", default="Llama-3.2-1B", help="shape of the random-weight checkpoint (GPU only)")
    ap.add_argument("--checkpoint-dir", default="/tmp/dp-scaling-llama-3.2-1b-random")
    ap.add_argument("--gpu-memory-util", type=float, default=0.3, help="per replica (two share the GPU)")
    ap.add_argument("--client-procs", type=int, default=0, help="load generator processes [default: 4, quick: 2]")
    ap.add_argument("--latency-n", type=int, default=0, help="requests per path for the added latency")
    ap.add_argument("--out", type=Path, help="write results.json and report.md here")
    args = ap.parse_args()
    procs = args.client_procs or (2 if args.quick else 4)
    lat_n = args.latency_n or (30 if args.quick else 200)
    work = Path(tempfile.mkdtemp(prefix="dp-scaling-"))
    t_start = time.monotonic()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU replicas, even on a GPU machine
    else:
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        os.environ["CUDA_VISIBLE_DEVICES"] = first  # one GPU: `--dp 2` puts both replicas on it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model = prepare_model(args, work)
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    extra = ["--dtype", "bfloat16", "--gpu-memory-util", str(args.gpu_memory_util)] if args.device == "cuda" else []
    launcher = ServerLauncher(str(model), work, extra=extra)
    key = launcher.api_key
    name = str(model)
    wls = workloads(args.quick)
    results: dict[str, Any] = {"device": _device(args.device), "model": name, "quick": args.quick,
                               "client_procs": procs, "workloads": [asdict(w) for w in wls], "runs": {}}
    ctx = mp.get_context("spawn")
    failures: list[str] = []
    check_prompts = _prompts(4, 8, vocab, seed=12345)

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    def record(label: str, w: Workload, res: dict[str, Any]) -> None:
        results["runs"].setdefault(w.name, {})[label] = res
        log(f"  {w.name:14s} {label:22s} {res['output_tok_s']:9.1f} out tok/s  {res['req_s']:7.2f} req/s  "
            f"e2e p50 {res['e2e_p50_ms']} ms  ok {res['ok']}/{res['requests']}")
        if res["ok"] != res["requests"]:
            failures.append(f"{w.name} {label}: {res['requests'] - res['ok']} failed, e.g. {res['errors'][:2]}")

    with ctx.Pool(procs) as pool:
        log(f"model {name} (vocab {vocab}); work dir {work}")
        # -- one replica: direct, then through a router of its own
        s1 = launcher.start(dp=1, name="dp1")
        router = None
        try:
            router = start_router(s1.url, work, key)
            log(f"dp 1 up at {s1.url}, router at {router.url}")
            g_direct = greedy(s1.url, key, name, check_prompts, 8)
            g_router = greedy(router.url, key, name, check_prompts, 8)
            if g_direct != g_router:
                failures.append(f"greedy outputs differ direct vs router: {g_direct} vs {g_router}")
            results["greedy_direct"] = g_direct
            results["latency"] = added_latency(s1.url, router.url, key, name, lat_n)
            log(f"router added latency: {results['latency']}")
            for i, w in enumerate(wls):
                warm = Workload(w.name, w.prompt_len, min(w.max_tokens, 4), w.concurrency, w.concurrency,
                                w.stream, w.bound)
                run_load(pool, procs, s1.url, key, name, warm, vocab, seed=900 + i)
                record("1 replica direct", w, run_load(pool, procs, s1.url, key, name, w, vocab, seed=100 + i))
                record("1 replica via router", w,
                       run_load(pool, procs, router.url, key, name, w, vocab, seed=200 + i))
        finally:
            if router is not None:
                router.stop()
            s1.stop()
        # -- two replicas on the same GPU, through the router `serve --dp 2` starts
        s2 = launcher.start(dp=2, name="dp2")
        try:
            log(f"dp 2 up at {s2.url}")
            g2 = greedy(s2.url, key, name, check_prompts, 8)
            results["greedy_dp2_matches"] = g2 == results.get("greedy_direct")
            before = served_per_replica(s2.url)
            for i, w in enumerate(wls):
                warm = Workload(w.name, w.prompt_len, min(w.max_tokens, 4), w.concurrency, w.concurrency,
                                w.stream, w.bound)
                run_load(pool, procs, s2.url, key, name, warm, vocab, seed=910 + i)
                record("2 replicas via router", w, run_load(pool, procs, s2.url, key, name, w, vocab, seed=300 + i))
            after = served_per_replica(s2.url)
            results["dp2_served_per_replica"] = [a - b for a, b in zip(after, before)]
            if min(results["dp2_served_per_replica"]) == 0:
                failures.append(f"a dp-2 replica served nothing: {results['dp2_served_per_replica']}")
        finally:
            s2.stop()
    results["failures"] = failures
    results["elapsed_s"] = round(time.monotonic() - t_start, 1)
    report = render(results, wls)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        (args.out / "report.md").write_text(report)
        for logf in work.glob("*.log"):
            shutil.copy(logf, args.out / logf.name)
    shutil.rmtree(work, ignore_errors=True)
    if failures:
        print("FAILED CHECKS:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def _device(kind: str) -> str:
    if kind == "cpu":
        return f"CPU ({os.cpu_count()} cores)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", "-i",
                              os.environ.get("CUDA_VISIBLE_DEVICES", "0")], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        return out or "GPU"
    except (OSError, subprocess.SubprocessError):
        return "GPU"


def render(res: dict[str, Any], wls: list[Workload]) -> str:
    lines = [f"# DP on one GPU: {res['device']}, {Path(res['model']).name}"
             f"{' (quick)' if res['quick'] else ''}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| workload | bound by | 1 replica direct | 1 replica via router | 2 replicas via router | "
             "2 vs 1 (router) | 2 vs 1 (direct) |", "|---|---|---|---|---|---|---|"]
    for w in wls:
        runs = res["runs"].get(w.name, {})
        a, b, c = (runs.get(k, {}).get("output_tok_s") for k in
                   ("1 replica direct", "1 replica via router", "2 replicas via router"))
        ratio_b = f"{c / b:.2f}x" if b and c else "-"
        ratio_a = f"{c / a:.2f}x" if a and c else "-"
        desc = (f"{w.name}: {w.prompt_len} in / {w.max_tokens} out, {w.concurrency} clients, "
                f"{'streamed' if w.stream else 'not streamed'}, {w.requests} req")
        lines.append(f"| {desc} | {w.bound} | {a} | {b} | {c} | {ratio_b} | {ratio_a} |")
    lines += ["", "Output tok/s (all requests' completion tokens / wall time). Full rows in results.json "
              "(req/s, e2e and TTFT p50, total tok/s incl. prompt).", ""]
    lat = res.get("latency")
    if lat:
        lines.append(f"Router added latency, 1-token completion, sequential, n={lat['n']} per path: direct p50 "
                     f"{lat['direct_p50_ms']} ms, via router {lat['router_p50_ms']} ms, added "
                     f"**{lat['added_p50_ms']} ms** (median of paired differences {lat['added_median_of_pairs_ms']} ms).")
    if "dp2_served_per_replica" in res:
        lines.append(f"Requests served by each dp-2 replica during the loads: {res['dp2_served_per_replica']}; "
                     f"greedy outputs identical on dp 2: {res.get('greedy_dp2_matches')}.")
    lines.append(f"Checks: {'all passed' if not res['failures'] else '; '.join(res['failures'])}. "
                 f"Elapsed {res['elapsed_s']} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # children stop in the finally blocks
    sys.exit(main())
