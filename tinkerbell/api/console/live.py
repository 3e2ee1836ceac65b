"""Live load: one row per replica (sequences, KV blocks, LoRA slots, queues, counters, memory by use).

`replica_view` turns one server's `/stats` JSON (plus its memory split) into the console's row; `merge_replicas`
builds the page's document from rows of any number of replicas. A single server serves `merge_replicas` of its
own row; the router is meant to fetch each replica's `GET /console/api/live` (forwarding the caller's key, so each
replica applies its own tenant filter) and answer with `merge_replicas(rows)` — see `merge_replicas`.
Rates (tokens/s) are left to the browser, from the difference between two polls of the cumulative counters, so
they mean the same whether one replica or a router answered.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request

from tinkerbell.api import ops
from tinkerbell.api.console.common import services, tenant
from tinkerbell.service.checkpoints import parse_tinker_path
from tinkerbell.service.errors import ServiceError

if TYPE_CHECKING:
    from tinkerbell.api.tinker import Services

router = APIRouter(prefix="/console/api")

_weights_bytes: dict[int, int] = {}


def _owner_label(s: "Services", key: str, who: str) -> tuple[str, bool]:
    """How a resident adapter key is shown to `who`: its name if it is theirs, else only that it is someone's
    (keys embed run ids, which are another tenant's business)."""
    owner = None
    try:
        if key.startswith("tinker://"):
            run, _, _ = parse_tinker_path(key)
            row = s.store.get_checkpoint(*parse_tinker_path(key)) or s.store.get_run(run)
            owner = row["tenant"] if row else None
        else:
            row = s.store.get_sampler(key)
            owner = row["tenant"] if row else None
    except ServiceError:
        owner = None
    return (key, True) if owner == who else ("another tenant's adapter", False)


def _model_bytes(s: "Services") -> int:
    # Parameter sizes are metadata (no tensor is read), so this is safe off the engine thread; cached per engine.
    eid = id(s.engine)
    if eid not in _weights_bytes:
        try:
            _weights_bytes[eid] = sum(p.numel() * p.element_size() for p in s.engine.model.parameters())
        except Exception:  # noqa: BLE001 - an engine without a torch model (tests' fakes) has no weights to count
            _weights_bytes[eid] = 0
    return _weights_bytes[eid]


def _kv_bytes(s: "Services", kv_blocks: int, block_size: int) -> int:
    try:
        cfg = s.engine.model_config
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * s.engine.dtype.itemsize
    except Exception:  # noqa: BLE001
        return 0
    return int(kv_blocks * block_size * per_token)


def memory(s: "Services", sampler: dict[str, Any]) -> dict[str, Any]:
    """Memory by use: model weights, the KV cache (preallocated), and the rest (training state, activations,
    LoRA slots) on the GPU; on CPU the process' resident size stands in for the device total."""
    weights = _model_bytes(s)
    kv = _kv_bytes(s, int(sampler.get("kv_blocks_total", 0)), int(sampler.get("kv_block_size", 0)))
    device = str(getattr(s.engine, "device", "cpu"))
    rows = [{"use": "model weights", "bytes": weights}, {"use": "KV cache", "bytes": kv}]
    total = None
    try:
        import torch

        if device.startswith("cuda") and torch.cuda.is_available():
            allocated = torch.cuda.memory_allocated(s.engine.device)
            reserved = torch.cuda.memory_reserved(s.engine.device)
            free, total = torch.cuda.mem_get_info(s.engine.device)
            rows.append({"use": "training, LoRA slots, activations", "bytes": max(0, allocated - weights - kv)})
            rows.append({"use": "cached by the allocator", "bytes": max(0, reserved - allocated)})
            rows.append({"use": "free", "bytes": int(free)})
        else:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            rows.append({"use": "rest of the process (training state, Python)", "bytes": max(0, rss - weights - kv)})
            total = rss
    except Exception:  # noqa: BLE001 - memory is informative; never fail the page over it
        pass
    return {"device": device, "rows": rows, "total_bytes": total}


def replica_view(stats: dict[str, Any], mem: dict[str, Any] | None, resident: list[dict[str, Any]]) -> dict:
    """A replica's row from its `/stats` document (tinkerbell.api.ops.collect), memory split and the resident
    adapters already labelled for the caller."""
    eng = stats.get("engine") or {}
    sampler = eng.get("sampler") or {}
    trainer = eng.get("trainer") or {}
    return {
        "model": stats.get("model"),
        "uptime_seconds": stats.get("uptime_seconds"),
        "requests": stats.get("total_requests"),
        "errors": stats.get("errors"),
        "sequences": {"running": sampler.get("running_seqs", 0), "waiting": sampler.get("waiting_seqs", 0),
                      "running_requests": sampler.get("running_requests", 0)},
        "kv_blocks": {"used": sampler.get("kv_blocks_used", 0), "total": sampler.get("kv_blocks_total", 0),
                      "cached": sampler.get("kv_blocks_cached", 0), "block_size": sampler.get("kv_block_size", 0)},
        "lora_slots": {"total": sampler.get("lora_slots_total", 0), "resident": resident,
                       "loads": sampler.get("lora_loads", 0)},
        "queues": {"training_requests": (stats.get("training") or {}).get("queued_requests", 0),
                   "engine_jobs": eng.get("queued_jobs", 0),
                   "sampling_in_flight": (stats.get("sampling") or {}).get("in_flight_requests", 0),
                   "futures_pending": (stats.get("futures") or {}).get("pending", 0)},
        "counters": {"tokens_sampled": sampler.get("tokens_generated",
                                                   (stats.get("sampling") or {}).get("tokens_sampled", 0)),
                     "tokens_trained": trainer.get("tokens_trained",
                                                   (stats.get("training") or {}).get("tokens_trained", 0)),
                     "forward_backward_calls": trainer.get("forward_backward_calls", 0),
                     "optim_steps": trainer.get("optim_steps", 0),
                     "train_batches": eng.get("train_batches", 0),
                     "preemptions": sampler.get("preemptions", 0),
                     "runs_loaded": trainer.get("runs", 0)},
        "memory": mem,
        "engine_error": eng.get("error"),
    }


def replica_row(name: str, healthy: bool, live_doc: dict[str, Any] | None = None,
                error: str | None = None) -> dict[str, Any]:
    """One row for `merge_replicas` from a replica's `GET /console/api/live` answer (None when it did not
    answer: the row then says unhealthy, with `error`)."""
    replicas = (live_doc or {}).get("replicas") or []
    view = replicas[0].get("view") if replicas else None
    return {"name": name, "healthy": bool(healthy and view is not None), "view": view,
            "error": error if view is None else None}


def merge_replicas(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The Live page's document from replica rows `{"name", "healthy": bool, "view": replica_view(...) | None,
    "error": str | None}`. The router calls this with one row per replica: `view` is `replicas[0].view` of that
    replica's `GET /console/api/live` (None, with `healthy: False`, when it did not answer)."""
    totals: dict[str, float] = {}
    for r in rows:
        v = r.get("view") or {}
        for group in ("sequences", "queues", "counters"):
            for k, val in (v.get(group) or {}).items():
                if isinstance(val, (int, float)):
                    totals[k] = totals.get(k, 0) + val
    return {"time": time.time(), "replicas": rows, "totals": totals,
            "healthy": sum(1 for r in rows if r.get("healthy")), "total": len(rows)}


@router.get("/live")
async def live(request: Request) -> dict[str, Any]:
    who = tenant(request)
    s = services(request)
    stats = ops.collect(request)
    sampler = (stats.get("engine") or {}).get("sampler") or {}
    resident = [{"label": label, "yours": yours}
                for label, yours in (_owner_label(s, k, who) for k in sampler.get("lora_slots_resident", []))]
    view = replica_view(stats, memory(s, sampler), resident)
    return merge_replicas([{"name": "this server", "healthy": True, "view": view, "error": None}])
