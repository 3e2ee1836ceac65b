"""Operations endpoints: `/healthz`, `/health`, `/stats` (the existing load balancer's JSON) and `/metrics`
(Prometheus text). No API key: load balancers and scrapers call these."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

router = APIRouter()


@dataclass
class OpsCounters:
    started: float = field(default_factory=time.time)
    requests: int = 0
    errors: int = 0


def _engine_stats(request: Request) -> dict[str, Any]:
    try:
        return request.app.state.services.engine.stats()
    except Exception as e:  # noqa: BLE001 - stats must never take the endpoint down
        return {"error": f"{type(e).__name__}: {e}"}


def collect(request: Request) -> dict[str, Any]:
    s = request.app.state.services
    ops: OpsCounters = request.app.state.ops
    return {
        "total_workers": 1,
        "healthy_workers": 1,
        "total_requests": ops.requests,
        "errors": ops.errors,
        "uptime_seconds": round(time.time() - ops.started, 1),
        "model": s.model_name,
        "futures": {"pending": s.futures.pending_count(), "completed": s.futures.completed,
                    "failed": s.futures.failed},
        "training": {"queued_requests": s.runs.queue_depth(), "tokens_trained": s.runs.tokens_trained},
        "sampling": {"in_flight_requests": s.samplers.in_flight, "samples_requested": s.samplers.samples_requested,
                     "tokens_sampled": s.samplers.tokens_sampled},
        "engine": _engine_stats(request),
        **_router_fields(request),
    }


def _router_fields(request: Request) -> dict[str, Any]:
    """What the data-parallel router reads from each replica every health interval: work not yet done, the
    training runs whose state lives in this process (their requests must come here) and the adapters in LoRA
    slots (OpenAI requests for them prefer this replica)."""
    s = request.app.state.services
    try:
        resident = list(s.engine.stats().get("sampler", {}).get("lora_slots_resident") or [])
    except Exception:  # noqa: BLE001 - stats must never take the endpoint down
        resident = []
    return {"outstanding": s.futures.pending_count(),
            "live_runs": sorted(getattr(s.runs, "_live", ())), "resident_adapters": resident}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return {"status": "ok", "model": request.app.state.services.model_name}


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    return collect(request)


def _flatten(prefix: str, value: Any, out: list[tuple[str, float]]) -> None:
    if isinstance(value, bool):
        out.append((prefix, float(value)))
    elif isinstance(value, (int, float)):
        out.append((prefix, float(value)))
    elif isinstance(value, dict):
        for k, v in value.items():
            key = "".join(c if c.isalnum() else "_" for c in str(k))
            _flatten(f"{prefix}_{key}", v, out)


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    st = collect(request)
    lines = [
        "# HELP tinkerbell_requests_total HTTP requests served.",
        "# TYPE tinkerbell_requests_total counter",
        f"tinkerbell_requests_total {st['total_requests']}",
        "# HELP tinkerbell_errors_total HTTP requests answered with an error status.",
        "# TYPE tinkerbell_errors_total counter",
        f"tinkerbell_errors_total {st['errors']}",
        "# TYPE tinkerbell_tokens_trained_total counter",
        f"tinkerbell_tokens_trained_total {st['training']['tokens_trained']}",
        "# TYPE tinkerbell_tokens_sampled_total counter",
        f"tinkerbell_tokens_sampled_total {st['sampling']['tokens_sampled']}",
        "# TYPE tinkerbell_training_queue_depth gauge",
        f"tinkerbell_training_queue_depth {st['training']['queued_requests']}",
        "# TYPE tinkerbell_sampling_in_flight gauge",
        f"tinkerbell_sampling_in_flight {st['sampling']['in_flight_requests']}",
        "# TYPE tinkerbell_futures_pending gauge",
        f"tinkerbell_futures_pending {st['futures']['pending']}",
    ]
    engine: list[tuple[str, float]] = []
    _flatten("tinkerbell_engine", st["engine"], engine)
    for name, v in engine:
        lines.append(f"# TYPE {name} gauge")
        lines.append(f"{name} {v:g}")
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
