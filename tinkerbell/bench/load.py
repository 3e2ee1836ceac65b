"""The OpenAI-client load driver every sampling scenario uses: N streamed /v1/completions at concurrency C,
each timed (time to first token, gaps between streamed tokens, end to end).

Prompts are random token ids (seeded) so input lengths are exact and no two requests share a cached prefix;
`ignore_eos` makes every request produce exactly its `max_tokens`, so output lengths are what the table says.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from tinkerbell.bench import progress

try:  # a few microseconds per event instead of tens: the client must not be what limits the figures
    import orjson
except ImportError:  # pragma: no cover - orjson is in requirements.lock
    orjson = None  # type: ignore[assignment]
from tinkerbell.bench.context import Target
from tinkerbell.bench.metrics import summarize

# Low ids are special tokens in most vocabularies; random ids above them make plain (if meaningless) text.
_FIRST_ID = 16
# Text chunks closer together than this came out of one buffer, not from decode steps: no decoder steps a
# request's tokens this fast, while a client parses a burst of buffered chunks in tens of microseconds each.
BURST_GAP_S = 0.002


@dataclass
class RequestSpec:
    prompt: list[int]
    max_tokens: int
    model: str | None = None  # None: the base model
    tag: str = ""


@dataclass
class RequestRecord:
    tag: str
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    start: float = 0.0
    ttft: float = float("nan")
    e2e: float = float("nan")
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def burst(self) -> bool:
        """Did the text arrive in one burst at the end (a server or proxy that buffers the stream) rather than
        spread over the generation? One burst: the chunks with text came back to back (median gap under
        BURST_GAP_S, or a single chunk) and the span from the first to the last is under a tenth of the request's
        time. Queueing does not look like this: a request that waited long for its first token still gets the
        rest a decode step or more apart, so the TTFT share of end-to-end time is no evidence either way."""
        if not self.ok or self.output_tokens < 4 or math.isnan(self.ttft):
            return False
        if not self.itl:
            return True  # every token's text in one chunk
        gaps = sorted(self.itl)
        return sum(gaps) < 0.1 * self.e2e and gaps[len(gaps) // 2] < BURST_GAP_S

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        if self.output_tokens < 2 or math.isnan(self.ttft):
            return float("nan")
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass
class LoadResult:
    records: list[RequestRecord]
    wall: float
    concurrency: int

    def ok(self, tag: str | None = None) -> list[RequestRecord]:
        return [r for r in self.records if r.ok and (tag is None or r.tag == tag)]

    @property
    def errors(self) -> int:
        return sum(not r.ok for r in self.records)

    def first_error(self) -> str:
        return next((r.error for r in self.records if not r.ok), "")

    @property
    def burst_share(self) -> float:
        """The share of the requests (of at least 4 output tokens) whose text arrived in one burst."""
        rs = [r for r in self.ok() if r.output_tokens >= 4 and not math.isnan(r.ttft)]
        return sum(r.burst for r in rs) / len(rs) if rs else 0.0

    @property
    def buffered(self) -> bool:
        """Most requests got their text in one burst: the stream was buffered somewhere on the way."""
        return self.burst_share >= 0.5

    def summary(self, tag: str | None = None) -> dict[str, float]:
        """Throughput over the whole run's wall time and latency percentiles (ms) of the `tag` requests."""
        rs = self.ok(tag)
        out_tokens = sum(r.output_tokens for r in rs)
        wall = max(self.wall, 1e-9)
        s: dict[str, float] = {"requests": float(len(rs)), "errors": float(self.errors), "wall_s": self.wall,
                               "output_tok_s": out_tokens / wall, "req_s": len(rs) / wall,
                               "total_tok_s": (out_tokens + sum(r.prompt_tokens for r in rs)) / wall}
        for name, values in (("ttft_ms", [r.ttft for r in rs]), ("itl_ms", [g for r in rs for g in r.itl]),
                             ("e2e_ms", [r.e2e for r in rs]), ("tpot_ms", [r.tpot for r in rs])):
            for k, v in summarize(values, 1000.0).items():
                if k != "n":
                    s[f"{name}_{k}"] = v
        return s


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    hi = max(vocab - 1, _FIRST_ID + 1)
    return [rng.randint(_FIRST_ID, hi) for _ in range(max(1, length))]


def fixed_requests(rng: random.Random, target: Target, n: int, in_len: int, out_len: int, tag: str = "",
                   model: str | None = None) -> list[RequestSpec]:
    in_len, out_len = fit(target, in_len, out_len)
    return [RequestSpec(random_prompt(rng, in_len, target.vocab_size), out_len, model, tag) for _ in range(n)]


def fit(target: Target, in_len: int, out_len: int) -> tuple[int, int]:
    """Lengths that fit the model's context window (input shrinks first: outputs are what we time)."""
    room = target.max_context - 1
    out_len = max(1, min(out_len, room // 2))
    return max(1, min(in_len, room - out_len)), out_len


def lognormal_lengths(rng: random.Random, n: int, median: int, cap: int, sigma: float = 0.8) -> list[int]:
    """Chat-like lengths: log-normal around `median` (ShareGPT-like spread), clipped to [4, cap]."""
    return [int(min(cap, max(4, round(rng.lognormvariate(math.log(median), sigma))))) for _ in range(n)]


def _loads(data: str) -> Any:
    return orjson.loads(data) if orjson is not None else json.loads(data)


async def _one(client: Any, target: Target, spec: RequestSpec, seed: int) -> RequestRecord:
    """One streamed request through the openai client. The client sends it (auth, URL, no retries) and hands
    back the raw event stream, which is read line by line with one JSON parse per event: the SDK's typed
    stream builds a pydantic object per chunk, which at tens of thousands of chunks a second would make the
    benchmark's own process the bottleneck, not the server."""
    rec = RequestRecord(spec.tag, False, len(spec.prompt), start=time.perf_counter())
    last = None
    chunks = 0
    try:
        async with client.completions.with_streaming_response.create(
                model=spec.model or target.model, prompt=spec.prompt, max_tokens=spec.max_tokens, temperature=1.0,
                seed=seed, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True}) as resp:
            async for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = _loads(data)
                now = time.perf_counter()
                if event.get("error"):  # the status line was sent already: the server reports in the stream
                    raise RuntimeError(f"error in the stream: {event['error'].get('message')}")
                choices = event.get("choices")
                if choices and choices[0].get("text"):
                    chunks += 1
                    if last is None:
                        rec.ttft = now - rec.start
                    else:
                        rec.itl.append(now - last)
                    last = now
                if event.get("usage"):
                    rec.output_tokens = int(event["usage"]["completion_tokens"])
        rec.e2e = time.perf_counter() - rec.start
        rec.output_tokens = rec.output_tokens or chunks
        rec.ok = True
    except Exception as e:  # noqa: BLE001 - a failed request is counted and reported, the run goes on
        rec.error = f"{type(e).__name__}: {e}"[:300]
        rec.e2e = time.perf_counter() - rec.start
    return rec


def openai_client(target: Target) -> Any:
    from openai import AsyncOpenAI

    # No client retries: a 429 or timeout is a measured error, not a hidden delay in the latency figures.
    return AsyncOpenAI(base_url=target.url.rstrip("/") + "/v1", api_key=target.api_key, max_retries=0,
                       timeout=900)


async def drive(target: Target, specs: list[RequestSpec], concurrency: int, desc: str, show: bool = True,
                seed: int = 0) -> LoadResult:
    """Send `specs` with at most `concurrency` in flight; one record per request, in submission order."""
    client = openai_client(target)
    sem = asyncio.Semaphore(max(1, concurrency))
    pbar = progress.bar(len(specs), desc, show)

    async def guarded(i: int, spec: RequestSpec) -> RequestRecord:
        async with sem:
            rec = await _one(client, target, spec, seed + i)
            pbar.update(1)
            return rec

    t0 = time.perf_counter()
    try:
        records = await asyncio.gather(*(guarded(i, s) for i, s in enumerate(specs)))
    finally:
        pbar.close()
        await client.close()
    return LoadResult(list(records), time.perf_counter() - t0, concurrency)


def run_load(target: Target, specs: list[RequestSpec], concurrency: int, desc: str, show: bool = True,
             seed: int = 0) -> LoadResult:
    return asyncio.run(drive(target, specs, concurrency, desc, show, seed))


def warm_up(target: Target, show: bool = False) -> None:
    """A few requests first, so one-time costs (kernel compilation, graph capture, lazy imports) stay out of
    the measured figures."""
    rng = random.Random(12345)
    run_load(target, fixed_requests(rng, target, 4, 16, 8), 4, "warm-up", show)
