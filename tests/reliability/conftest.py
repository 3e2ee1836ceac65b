"""Reliability fixtures and checks shared by the fuzz, fault, load and security tests.

The in-process tests reuse tests/api's `app_factory` / `wire` (FakeEngine, TestClient); the fault and load tests
run the real `tinkerbell serve` process (tests/e2e's ServerProcess) on the tiny fixture model. The long fuzz
runs only with TINKERBELL_LONG_FUZZ=1.
"""

from __future__ import annotations

import os
from typing import Any

from tests.api.conftest import app_factory, fake_engine, wire  # noqa: F401 - fixtures reused, not duplicated

LONG_FUZZ = os.environ.get("TINKERBELL_LONG_FUZZ", "") not in ("", "0")


def examples(bounded: int, long: int = 2000) -> int:
    """Hypothesis examples per property: bounded in `make test`, many more behind TINKERBELL_LONG_FUZZ=1."""
    return long if LONG_FUZZ else bounded


def header(r: Any, name: str) -> str:
    """A response header from httpx/TestClient (str) or schemathesis (list of str) responses."""
    v = r.headers.get(name) or r.headers.get(name.lower()) or r.headers.get(name.title()) or ""
    return v[0] if isinstance(v, list) else v


def assert_clean_answer(r: Any, what: str = "") -> None:
    """The status-code discipline every answer to bad input must keep (tinker_api.md 1.6/1.7/8.8): never a 5xx;
    every error a JSON `detail` string with an explicit, non-zero Content-Length (a bare 400 reads as a dropped
    connection to the SDK, which then retries for minutes)."""
    where = f"{what}: " if what else ""
    assert r.status_code < 500, f"{where}{r.status_code} {r.text[:500]}"
    if r.status_code >= 400 and r.status_code != 408:
        assert r.status_code not in (402, 409), f"{where}{r.status_code} makes the SDK retry or pause: {r.text}"
        assert header(r, "content-type").startswith("application/json"), f"{where}{r.headers}"
        assert int(header(r, "content-length") or 0) > 0, f"{where}no Content-Length: {r.headers}"
        body = r.json()
        # Tinker face: {"detail": "..."}; OpenAI face: {"error": {"message": "..."}} (OpenAI clients read that).
        detail = body.get("detail") if "detail" in body else (body.get("error") or {}).get("message")
        assert isinstance(detail, str) and len(detail) >= 8, f"{where}detail too thin: {r.text}"
        if r.status_code == 429:
            assert header(r, "retry-after"), f"{where}429 without Retry-After"


def fuzz_settings(bounded: int, long: int = 2000):
    """Hypothesis settings for a server property: reproducible in `make test` (derandomised, no example database
    written into the tree), random and much longer with TINKERBELL_LONG_FUZZ=1."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=examples(bounded, long), deadline=None, suppress_health_check=list(HealthCheck),
                    derandomize=not LONG_FUZZ, database=None, print_blob=True)
