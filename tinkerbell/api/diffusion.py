"""Diffusion-LM endpoints: `GET /generation/algorithms` and `GET /batch/stats` (the existing LLaDA server's).
(Block streaming needs no route of its own: the OpenAI face's live stream is fed by `SampleJob.on_block`.)

`install(app)` adds the routes; they answer for any served model (an autoregressive one lists no algorithms).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request

from tinkerbell.engine.diffusion import algorithm_listing

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

