#!/usr/bin/env python
"""Load test with the OpenAI client: N completions at concurrency C against a server or a router.

Prints requests/s, generated tokens/s, latency p50/p90/p99, and how the requests spread over replicas (from the
/stats of a router, or the one server's own counters). Every figure is measured in this run.

    python examples/stress_test.py --url http://127.0.0.1:8000 --num-requests 200 --concurrency 32
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import api_key, base_model, parser, percentile  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "My favourite food is",
           "In the beginning", "Alice, Bob and Carol"]


def stats(url: str) -> dict:
    return httpx.get(url.rstrip("/") + "/stats", timeout=30).json()


def served(st: dict) -> dict[str, int]:
    """Requests served per replica: a router lists its workers; a single server counts its own."""
    if isinstance(st.get("workers"), list):
        return {w.get("url", str(w.get("index"))): int(w.get("requests_served", 0)) for w in st["workers"]}
    return {"this server": int(st.get("total_requests", 0))}


async def run(args, model: str) -> tuple[list[float], int, int, float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=api_key(args), max_retries=0,
                         timeout=600)
    sem = asyncio.Semaphore(args.concurrency)
    latencies: list[float] = []
    tokens = errors = 0

    async def one(i: int) -> None:
        nonlocal tokens, errors
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)],
                                                    max_tokens=args.max_tokens, temperature=0.8, seed=i)
            except Exception as e:  # noqa: BLE001 - counted and reported, the test goes on
                errors += 1
                if errors <= 3:
                    print(f"request {i} failed: {type(e).__name__}: {e}", file=sys.stderr)
                return
            latencies.append(time.perf_counter() - t0)
            tokens += r.usage.completion_tokens if r.usage else 0

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.num_requests)))
    wall = time.perf_counter() - t0
    await client.close()
    return latencies, tokens, errors, wall


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=None, help="completions to send (default 200; --quick 12)")
    p.add_argument("--concurrency", type=int, default=None, help="in flight at once (default 32; --quick 4)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per completion (default 64; --quick 8)")
    args = p.parse_args()
    args.num_requests = args.num_requests or (12 if args.quick else 200)
    args.concurrency = args.concurrency or (4 if args.quick else 32)
    args.max_tokens = args.max_tokens or (8 if args.quick else 64)
    model = base_model(args)
    before = served(stats(args.url))
    latencies, tokens, errors, wall = asyncio.run(run(args, model))
    after = served(stats(args.url))
    ok = len(latencies)
    print(f"{args.url} /v1/completions, model {model}: {args.num_requests} requests at concurrency "
          f"{args.concurrency}, max_tokens {args.max_tokens}")
    print(f"  ok {ok}, errors {errors}, wall {wall:.2f}s")
    print(f"  throughput  {ok / wall:8.2f} requests/s   {tokens / wall:10.1f} generated tokens/s")
    print(f"  latency     p50 {percentile(latencies, 50):.3f}s   p90 {percentile(latencies, 90):.3f}s   "
          f"p99 {percentile(latencies, 99):.3f}s")
    print("  spread over replicas (requests served during this run, incl. /stats calls):")
    for name in after:
        print(f"    {name:<40} {after[name] - before.get(name, 0):>8}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
