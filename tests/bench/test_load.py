"""The load driver's reading of a stream, against real SSE servers on loopback driven by the real openai client:
a stream buffered until the completion is done is told apart from a live one whose first token waited in a
queue (at high concurrency TTFT is most of end-to-end time, yet the stream is live)."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from tests.api.conftest import LiveServer
from tinkerbell.bench import load
from tinkerbell.bench.context import Target

TOKENS = 16
STEP_S = 0.01  # one decode step of the pretend engine
QUEUE_S = 0.8  # how long a request waits before its first token (long beside 16 steps: TTFT ≈ 84% of e2e)


def _chunk(text: str) -> str:
    return "data: " + json.dumps({"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "m",
                                  "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]})


def _end() -> str:
    usage = {"prompt_tokens": 4, "completion_tokens": TOKENS, "total_tokens": TOKENS + 4}
    return ("data: " + json.dumps({"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "m",
                                   "choices": [], "usage": usage}) + "\n\ndata: [DONE]\n\n")


def _app(buffered: bool) -> Starlette:
    async def completions(request):  # noqa: ANN001 - starlette's handler signature
        async def live():
            await asyncio.sleep(QUEUE_S)
            for i in range(TOKENS):
                yield _chunk(f" w{i}") + "\n\n"
                await asyncio.sleep(STEP_S)
            yield _end()

        async def held():  # generates at the same pace, but sends nothing until the end
            await asyncio.sleep(QUEUE_S + TOKENS * STEP_S)
            for i in range(TOKENS):
                yield _chunk(f" w{i}") + "\n\n"
            yield _end()

        return StreamingResponse(held() if buffered else live(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


def _drive(buffered: bool) -> load.LoadResult:
    with LiveServer(_app(buffered)) as srv:
        target = Target(srv.url, "k", "m", {"vocab_size": 100, "max_context_length": 64})
        specs = [load.RequestSpec([20, 21, 22, 23], TOKENS) for _ in range(4)]
        return asyncio.run(load.drive(target, specs, 4, "test", show=False))


@pytest.fixture(scope="module")
def queued() -> load.LoadResult:
    return _drive(buffered=False)


@pytest.fixture(scope="module")
def held() -> load.LoadResult:
    return _drive(buffered=True)


def test_a_queued_live_stream_is_not_called_buffered(queued):
    s = queued.summary()
    assert s["ttft_ms_p50"] >= 0.8 * s["e2e_ms_p50"]  # what the old TTFT-share rule took for buffering
    assert queued.burst_share == 0.0 and not queued.buffered


def test_a_stream_sent_only_when_finished_is_called_buffered(held):
    assert all(r.ok and r.output_tokens == TOKENS for r in held.records)
    assert held.burst_share == 1.0 and held.buffered


def test_a_single_chunk_with_the_whole_text_is_a_burst():
    rec = load.RequestRecord("", True, 4, output_tokens=TOKENS, ttft=0.5, e2e=0.5)
    assert rec.burst
    assert not load.RequestRecord("", True, 4, output_tokens=2, ttft=0.5, e2e=0.5).burst  # too short to tell
