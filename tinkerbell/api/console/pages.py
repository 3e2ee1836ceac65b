"""The console's pages and static assets. Pages are one shell template: it carries no data (a page load cannot
send the API key header), only which view to start; the view's module fetches its data from `/console/api/`."""

from __future__ import annotations

import html
from functools import lru_cache
from pathlib import Path
from string import Template

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from tinkerbell.service.errors import NotFound

router = APIRouter(prefix="/console")

HERE = Path(__file__).parent
STATIC = HERE / "static"
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".svg": "image/svg+xml", ".png": "image/png"}
# Everything from this origin, nothing inline, nothing from anywhere else: the console works offline and an XSS
# through user-controlled names (run metadata, checkpoint names) has no inline script to run.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
VIEWS = {"runs": "Runs", "run": "Run", "checkpoints": "Checkpoints", "playground": "Playground", "live": "Live",
         "bench": "Benchmarks"}


@lru_cache(maxsize=1)
def _shell() -> Template:
    return Template((HERE / "templates" / "shell.html").read_text())


def render(view: str, arg: str = "") -> HTMLResponse:
    body = _shell().substitute(view=view, arg=html.escape(arg, quote=True), title=html.escape(VIEWS[view]))
    return HTMLResponse(body, headers=SECURITY_HEADERS)


@router.get("")
async def index() -> RedirectResponse:
    return RedirectResponse("/console/runs", status_code=307)


@router.get("/runs")
async def runs_page() -> HTMLResponse:
    return render("runs")


@router.get("/runs/{run:path}")
async def run_page(run: str) -> HTMLResponse:
    return render("run", run)


@router.get("/checkpoints")
async def checkpoints_page() -> HTMLResponse:
    return render("checkpoints")


@router.get("/playground")
async def playground_page() -> HTMLResponse:
    return render("playground")


@router.get("/live")
async def live_page() -> HTMLResponse:
    return render("live")


@router.get("/bench")
async def bench_page() -> HTMLResponse:
    return render("bench")


@router.get("/static/{name}")
async def static(name: str, request: Request) -> Response:
    path = (STATIC / name).resolve()
    if path.parent != STATIC.resolve() or not path.is_file() or path.suffix not in STATIC_TYPES:
        raise NotFound(f"no console asset {name!r}")
    # Assets change only with the package version; a short cache keeps reloads instant without stale upgrades.
    return FileResponse(path, media_type=STATIC_TYPES[path.suffix],
                        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"})
