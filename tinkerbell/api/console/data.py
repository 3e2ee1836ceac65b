"""Console JSON routes for runs and checkpoints: read and change through the same service objects as the API."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from tinkerbell.api.console.common import services, tenant, tenant_for_change
from tinkerbell.service.checkpoints import validate_kind
from tinkerbell.service.errors import BadRequest
from tinkerbell.service.store import iso

router = APIRouter(prefix="/console/api")

MAX_RUNS = 200
# A run with no request for this long is shown as idle rather than active.
IDLE_AFTER_SECONDS = 600


@router.get("/config")
async def config(request: Request) -> dict[str, Any]:
    """Unauthenticated on purpose: the page must know whether to ask for a key before it has one."""
    return {"no_auth": services(request).config.no_auth}


@router.get("/whoami")
async def whoami(request: Request) -> dict[str, Any]:
    s = services(request)
    return {"tenant": tenant(request), "no_auth": s.config.no_auth, "model": s.model_name}


def _state(request: Request, row: dict[str, Any]) -> str:
    """A run's state in words. RunManager keeps which runs are loaded in this process privately; reading it is
    the only way to tell a live run from one a restart left behind, so fall back gracefully if it moves."""
    runs = services(request).runs
    model_id = row["model_id"]
    if model_id in getattr(runs, "_dead", {}):
        return "failed"
    if not row["trainable"]:
        return "copy"
    session = services(request).store.get_session(row["session_id"]) if row["session_id"] else None
    if session is not None and session["finished"] is not None:
        return "finished"
    if model_id not in getattr(runs, "_live", {model_id}):
        return "not loaded"
    return "idle" if time.time() - row["last_request_time"] > IDLE_AFTER_SECONDS else "active"


def _steps(history: list[dict[str, Any]]) -> int:
    return sum(1 for h in history if h["kind"] == "optim_step")


def _run_summary(request: Request, row: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    losses = [h["metrics"].get("loss:sum") for h in history if h["kind"] == "forward_backward"]
    losses = [v for v in losses if v is not None]
    return {
        "model_id": row["model_id"],
        "base_model": row["base_model"],
        "lora_rank": row["lora_rank"],
        "state": _state(request, row),
        "steps": _steps(history),
        "forward_backward_calls": sum(1 for h in history if h["kind"] == "forward_backward"),
        "last_loss": losses[-1] if losses else None,
        "created": iso(row["created"]),
        "last_activity": iso(row["last_request_time"]),
        "user_metadata": row["user_metadata"],
    }


@router.get("/runs")
async def list_runs(request: Request, limit: int = 50, offset: int = 0) -> dict[str, Any]:
    t = tenant(request)
    s = services(request)
    rows, total = s.store.list_runs(t, max(1, min(limit, MAX_RUNS)), max(0, offset))
    out = [_run_summary(request, r, s.store.metrics_of_run(r["model_id"])) for r in rows]
    return {"runs": out, "total": total}


@router.get("/runs/{run}")
async def get_run(run: str, request: Request) -> dict[str, Any]:
    t = tenant(request)
    s = services(request)
    row = s.runs.require(t, run)  # another tenant's run: the API's own 404
    history = s.store.metrics_of_run(run)
    summary = _run_summary(request, row, history)
    summary.update(train_attn=row["train_attn"], train_mlp=row["train_mlp"], train_unembed=row["train_unembed"],
                   optimizer=row["optimizer"], session_id=row["session_id"])
    return {
        "run": summary,
        "history": [{"seq_id": h["seq_id"], "kind": h["kind"], "time": h["time"], "metrics": h["metrics"]}
                    for h in history],
        "checkpoints": s.checkpoints.list_for_run(run),
    }


@router.get("/checkpoints")
async def list_checkpoints(request: Request, limit: int = 100, offset: int = 0) -> dict[str, Any]:
    items, total = services(request).checkpoints.list_for_tenant(tenant(request), max(1, min(limit, 1000)),
                                                                 max(0, offset))
    return {"checkpoints": items, "total": total}


def _owned(request: Request, t: str, run: str, kind: str, name: str) -> None:
    s = services(request)
    validate_kind(kind)
    s.runs.require(t, run)
    s.checkpoints.get_owned(t, run, kind, name)


@router.delete("/checkpoints/{run}/{kind}/{name}")
async def delete_checkpoint(run: str, kind: str, name: str, request: Request) -> dict[str, Any]:
    t = tenant_for_change(request)
    s = services(request)
    _owned(request, t, run, kind, name)
    s.checkpoints.delete(t, run, kind, name)
    s.samplers.invalidate(f"tinker://{run}/{kind}/{name}")  # as the API's delete does
    return {"deleted": f"tinker://{run}/{kind}/{name}"}


@router.post("/checkpoints/{run}/{kind}/{name}/publish")
async def set_published(run: str, kind: str, name: str, request: Request) -> dict[str, Any]:
    t = tenant_for_change(request)
    body = await request.json()
    public = body.get("public") if isinstance(body, dict) else None
    if not isinstance(public, bool):
        raise BadRequest(f"body.public must be true or false (got {public!r})")
    _owned(request, t, run, kind, name)
    services(request).checkpoints.set_public(t, run, kind, name, public)
    return {"public": public}


@router.post("/checkpoints/{run}/{kind}/{name}/ttl")
async def set_ttl(run: str, kind: str, name: str, request: Request) -> dict[str, Any]:
    t = tenant_for_change(request)
    body = await request.json()
    ttl = body.get("ttl_seconds") if isinstance(body, dict) else None
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool)):
        raise BadRequest(f"body.ttl_seconds must be an integer number of seconds or null (got {ttl!r})")
    _owned(request, t, run, kind, name)
    services(request).checkpoints.set_ttl(t, run, kind, name, ttl)
    return {"ttl_seconds": ttl}


def _zip_folder(folder: Path, prefix: str) -> str:
    # Stored, not deflated: safetensors barely compress, and zipping stays as fast as copying.
    fd, path = tempfile.mkstemp(prefix="tinkerbell-ckpt-", suffix=".zip")
    os.close(fd)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            zf.write(f, f"{prefix}/{f.relative_to(folder).as_posix()}")
    return path


@router.get("/checkpoints/{run}/{kind}/{name}/archive")
async def download_archive(run: str, kind: str, name: str, request: Request) -> FileResponse:
    """The checkpoint's folder (PEFT adapter_model.safetensors + adapter_config.json, plus optimizer state for
    `weights`) as a zip. Fetched by the console with its header, so the key never appears in a URL."""
    t = tenant(request)
    s = services(request)
    _owned(request, t, run, kind, name)
    folder = s.checkpoints.dir_for(run, kind, name)
    if not folder.is_dir():
        raise BadRequest(f"checkpoint tinker://{run}/{kind}/{name} is recorded but its files are missing")
    label = f"{run.replace(':', '_')}-{kind}-{name}"
    path = await asyncio.to_thread(_zip_folder, folder, label)
    return FileResponse(path, media_type="application/zip", filename=f"{label}.zip",
                        background=BackgroundTask(os.unlink, path))
