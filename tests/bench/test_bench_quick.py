"""`tinkerbell bench --quick` end to end on the CPU against the tiny fixture model: the real command starts the
real server, drives it with the openai client and the tinker SDK, and writes the report. The checks are about
the report's structure (files, tables, columns, results.json, PNGs), never its speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Columns a reader relies on in each scenario's first table (the report may add more).
EXPECTED_COLUMNS = {
    "sampling": ["workload", "output tok/s", "req/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms", "peer tok/s",
                 "ours/peer", "roofline tok/s"],
    "concurrency": ["clients", "output tok/s", "e2e p50 ms", "e2e p99 ms", "TTFT p50 ms"],
    "mixed": ["short requests", "e2e p50 ms", "e2e p99 ms", "slowdown p50", "slowdown p99"],
    "lora": ["adapters", "output tok/s", "vs base", "e2e p50 ms"],
    "training": ["workload", "users", "tokens/s", "MFU", "peer tokens/s", "ours/peer"],
    "scaling": ["DP", "output tok/s", "speedup", "efficiency"],
}
PLOTS = {"sampling": "sampling_latency_cdf.png", "concurrency": "concurrency.png", "mixed": "mixed_latency_cdf.png",
         "lora": "lora.png", "training": "training_loss.png", "scaling": "scaling.png"}


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TINKER_TELEMETRY="0")
    return subprocess.run([sys.executable, "-m", "tinkerbell", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def quick_report(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "report"
    r = _bench("--model", str(tiny_llama_dir), "--quick", "--no-progress", "--out", str(out))
    assert r.returncode == 0, f"bench failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-4000:]}"
    return out


def _table_header(md: str, title: str) -> list[str]:
    lines = md.splitlines()
    i = lines.index(f"### {title}")
    header = lines[i + 2]
    assert lines[i + 3].startswith("|---")
    return [c.strip() for c in header.strip("|").split("|")]


def test_quick_report_structure(quick_report: Path):
    data = json.loads((quick_report / "results.json").read_text())
    assert data["schema"] == "tinkerbell-bench/1" and data["quick"] is True
    env = data["environment"]
    for key in ("torch", "python", "model", "device", "dtype", "tinkerbell_commit", "gpus", "cpu"):
        assert key in env
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["params"] > 0
    assert env["server_started_by_bench"] is True
    md = (quick_report / "report.md").read_text()
    assert "## Environment" in md and "torch, python" in md
    for name, cols in EXPECTED_COLUMNS.items():
        s = data["scenarios"][name]
        assert s["status"] == "ok", f"{name}: {s['reason']} {s['notes']}"
        assert s["tables"] and s["metrics"], name
        first = s["tables"][0]
        assert all(c in first["columns"] for c in cols), (name, first["columns"])
        assert all(len(row) == len(first["columns"]) for row in first["rows"]) and first["rows"]
        assert _table_header(md, first["title"]) == first["columns"]
        assert PLOTS[name] in s["plots"] and f"![{name}]({PLOTS[name]})" in md
        png = (quick_report / PLOTS[name]).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 2000
    m = {k: v for s in data["scenarios"].values() for k, v in s["metrics"].items()}
    assert m["fixed.output_tok_s"] > 0 and m["fixed.errors"] == 0
    assert m["fixed.peer_output_tok_s"] > 0  # the HF peer ran in the same run
    assert m["single.peer_tok_s"] > 0 and m["rl.tokens"] > 0
    assert m["a4.output_tok_s"] > 0 and m["dp2.output_tok_s"] > 0
    assert (quick_report / "server.log").exists()


def test_pngs_are_valid_images(quick_report: Path):
    from PIL import Image

    for name in PLOTS.values():
        with Image.open(quick_report / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200


def test_compare_against_itself(quick_report: Path):
    r = _bench("compare", str(quick_report / "results.json"), str(quick_report), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "sampling.fixed.output_tok_s" in r.stdout and "+0.0%" in r.stdout


def test_bench_against_a_running_server(tiny_llama_dir, tmp_path):
    """--url: a server someone else started; scaling needs servers of its own, so it is skipped, not failed."""
    srv = ServerProcess(tiny_llama_dir, tmp_path / "data", tmp_path / "srv.log", ["--api-key", "tml-bench-url"])
    srv.start()
    try:
        out = tmp_path / "r"
        r = _bench("--url", srv.url, "--api-key", "tml-bench-url", "--scenarios", "sampling,scaling", "--quick",
                   "--no-peer", "--no-progress", "--out", str(out))
    finally:
        srv.stop()
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert set(data["scenarios"]) == {"sampling", "scaling"}
    assert data["scenarios"]["sampling"]["status"] == "ok"
    assert data["scenarios"]["scaling"]["status"] == "skipped"
    assert data["environment"]["server_started_by_bench"] is False
    assert data["scenarios"]["sampling"]["metrics"]["fixed.peer_output_tok_s"] is None
    assert "tml-bench-url" not in (out / "report.md").read_text()  # the key is masked in the command line
