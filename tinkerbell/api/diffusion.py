"""Diffusion-LM endpoints: `GET /generation/algorithms` and `GET /batch/stats` (the existing LLaDA server's), plus
`stream_blocks`, which turns a diffusion request into an async stream of finished blocks for SSE faces.

`install(app)` adds the routes; they answer for any served model (an autoregressive one lists no algorithms).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, FastAPI, Request

from tinkerbell.engine.diffusion import algorithm_listing
from tinkerbell.engine.types import SampleJob, SampleResult

router = APIRouter()


def _sampler(request: Request) -> Any:
    return getattr(request.app.state.services.engine, "sampler", None)


def _is_diffusion(request: Request) -> bool:
    cfg = getattr(request.app.state.services.engine, "model_config", None)
    return bool(getattr(cfg, "is_diffusion", False))


@router.get("/generation/algorithms")
async def algorithms(request: Request) -> dict[str, Any]:
    if not _is_diffusion(request):
        return {"default": None, "algorithms": [], "remasking": [],
                "note": "the served model is autoregressive; generation algorithms apply to diffusion LMs"}
    return algorithm_listing(_sampler(request).algorithm)


@router.get("/batch/stats")
async def batch_stats(request: Request) -> dict[str, Any]:
    sampler = _sampler(request)
    if sampler is None:  # an engine without a sampler of its own (an embedder's): its overall stats
        return request.app.state.services.engine.stats()
    stats = sampler.stats()
    keys = ("max_batch_size", "max_wait_time", "pending_requests", "batches_run", "mean_batch_size",
            "batch_size_histogram", "running_seqs", "waiting_seqs", "algorithm")
    return {k: stats.get(k) for k in keys if k in stats} if _is_diffusion(request) else stats


def install(app: FastAPI) -> None:
    app.include_router(router)


async def stream_blocks(engine: Any, job: SampleJob) -> AsyncIterator[tuple[int, list[int], bool]]:
    """(sample_index, tokens, finished) as each block of each sample becomes final, then the engine's result
    is awaited (so errors surface here). Blocks are pushed from the engine thread onto this event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, list[int], bool] | None] = asyncio.Queue()

    def on_block(index: int, tokens: list[int], finished: bool) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (index, list(tokens), finished))

    fut = engine.sample(replace(job, on_block=on_block))
    fut.add_done_callback(lambda _f: loop.call_soon_threadsafe(queue.put_nowait, None))
    while True:
        item = await queue.get()
        if item is None:
            break
        yield item
    result: SampleResult = await asyncio.wrap_future(fut)
    del result  # the caller has every token already; awaiting re-raises a failure
