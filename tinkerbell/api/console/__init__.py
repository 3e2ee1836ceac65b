"""The web console at `/console`: runs and their curves, checkpoints, a chat playground, live load, benchmarks.

Pages are static shells (HTML + ES modules, every asset shipped in this package, nothing from a CDN); the data
comes from JSON routes under `/console/api/` that authenticate exactly like the Tinker API and read the same
service objects (`Services`), so there is no second path to the data.

Why header auth makes the console CSRF-safe: the browser keeps the API key in `sessionStorage` and JavaScript
sends it as `X-API-Key` on each call. No cookie is ever set, so a page on another origin has no ambient
credential to ride on: it cannot read sessionStorage of this origin, and a cross-origin request carrying a custom
header needs a CORS preflight, which this server never grants. State-changing routes additionally require the
`X-Tinkerbell-Console` header so the same holds under `--no-auth`, where there is no key at all.
"""

from __future__ import annotations

from fastapi import APIRouter

from tinkerbell.api.console import bench, data, live, pages, playground


def build_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)
    for mod in (data, playground, live, bench):
        router.include_router(mod.router)
    router.include_router(pages.router)  # last: its catch-all page routes must not shadow the API
    return router


router = build_router()

__all__ = ["router", "build_router"]
