"""Benchmark reports that `tinkerbell bench` left under `<data-dir>/bench/`: listed, and each file served for the
console to render (JSON and CSV as tables, Markdown and text as text, PNG/SVG plots as images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from tinkerbell.api.console.common import services, tenant
from tinkerbell.service.errors import NotFound
from tinkerbell.service.store import iso

router = APIRouter(prefix="/console/api/bench")

TYPES = {".json": "application/json", ".md": "text/markdown; charset=utf-8", ".txt": "text/plain; charset=utf-8",
         ".csv": "text/csv; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
MAX_FILES = 500


def bench_dir(request: Request) -> Path:
    return Path(services(request).config.data_dir) / "bench"


@router.get("")
async def list_reports(request: Request) -> dict[str, Any]:
    tenant(request)
    root = bench_dir(request)
    files = []
    if root.is_dir():
        for f in sorted(root.rglob("*"), key=lambda p: p.stat().st_mtime, reverse=True)[:MAX_FILES]:
            if f.is_file() and f.suffix.lower() in TYPES:
                st = f.stat()
                files.append({"name": f.relative_to(root).as_posix(), "type": f.suffix.lower()[1:],
                              "size_bytes": st.st_size, "modified": iso(st.st_mtime)})
    return {"dir": str(root), "files": files}


@router.get("/file/{name:path}")
async def report_file(name: str, request: Request) -> FileResponse:
    tenant(request)
    root = bench_dir(request).resolve()
    target = (root / name).resolve()
    if root not in target.parents or not target.is_file() or target.suffix.lower() not in TYPES:
        raise NotFound(f"no benchmark report {name!r} under {root}")
    # SVGs can carry script: sandbox whatever is served here so it runs nothing even if opened directly.
    return FileResponse(target, media_type=TYPES[target.suffix.lower()],
                        headers={"Content-Security-Policy": "sandbox; default-src 'none'; style-src 'unsafe-inline'",
                                 "X-Content-Type-Options": "nosniff"})
