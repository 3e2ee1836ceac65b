"""Console fixtures: the real server on loopback (tests/e2e's ServerProcess) and a real headless Chromium.

The browser is Debian's /usr/bin/chromium driven by Playwright (`executable_path`, no `playwright install`).
Without it the browser tests fail, naming the fix: `.ci/run` installs it, and a console nobody looked at in a
browser is not tested.
Set TINKERBELL_SCREENSHOTS=docs/console to (re)write the README's screenshots from the test run.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.conftest import KEY_ALICE, KEY_BOB, ServerProcess

CHROMIUM = os.environ.get("TINKERBELL_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
SHOTS = os.environ.get("TINKERBELL_SCREENSHOTS")


def _png() -> bytes:
    """A 1x1 PNG: enough for the browser to decode a plot."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x2f\x5d\x8a")) + chunk(b"IEND", b""))


def _bench_reports(data_dir: Path) -> None:
    bench = data_dir / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    (bench / "sampling.json").write_text(json.dumps({
        "model": "tiny-llama", "device": "cpu",
        "results": [{"concurrency": 1, "tokens_per_s": 812.5, "p50_ms": 9.1},
                    {"concurrency": 8, "tokens_per_s": 3120.0, "p50_ms": 21.7}]}))
    (bench / "training.csv").write_text("batch_tokens,tokens_per_s\n1024,5400\n4096,9100\n")
    # The layout `tinkerbell bench` writes: one folder per run with report.md, results.json and PNG plots.
    run = bench / "20250101-000000"
    run.mkdir()
    (run / "report.md").write_text("# Benchmark report\n\n## sampling\n\n| concurrency | tokens/s |\n|---|---|\n"
                                   "| 1 | 777 |\n\n![sampling](sampling.png)\n")
    (run / "results.json").write_text(json.dumps({"scenarios": [{"name": "sampling", "status": "ok"}]}))
    (run / "sampling.png").write_bytes(_png())


@pytest.fixture(scope="module")
def console_server(tiny_llama_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("console")
    _bench_reports(root / "data")
    srv = ServerProcess(tiny_llama_dir, root / "data", root / "server.log",
                        ["--api-key", KEY_ALICE, "--api-key", KEY_BOB])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.fail(f"the console tests need Chromium at {CHROMIUM}: install it with `apt-get install -y chromium` "
                    "(.ci/run does), or point TINKERBELL_CHROMIUM at a Chromium binary", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the console tests need the `playwright` package (pinned in requirements.lock): "
                    "`make install` installs it", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


class Tab:
    """A page in a fresh browser context (its own sessionStorage) that records every console error."""

    def __init__(self, browser: Any, base: str, width: int = 1100, height: int = 800):
        self.base = base
        self.context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(45_000)  # generous: CI shares 2 cores with the server
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def goto(self, path: str) -> Any:
        self.page.goto(self.base + path)
        return self.page

    def sign_in(self, key: str) -> None:
        self.goto("/console/runs")
        self.page.fill("#key", key)
        self.page.press("#key", "Enter")
        self.page.wait_for_selector("#who >> text=tenant")

    def shot(self, name: str) -> None:
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def tab_factory(browser, console_server):
    tabs: list[Tab] = []

    def make(**kw: Any) -> Tab:
        t = Tab(browser, console_server.url, **kw)
        tabs.append(t)
        return t

    yield make
    for t in tabs:
        t.close()
