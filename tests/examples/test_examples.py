"""Every example runs in --quick mode against a real server and prints the figures it measured."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import KEY_ALICE

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def run_example(server, name: str, *extra: str) -> str:
    env = dict(os.environ, TINKER_TELEMETRY="0", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick", "--url", server.url, "--api-key", KEY_ALICE,
                        *extra], capture_output=True, text=True, timeout=240, env=env, cwd=EXAMPLES.parent)
    assert r.returncode == 0, f"{name} exited {r.returncode}\n{r.stdout}\n{r.stderr}\n{server.log_tail()}"
    return r.stdout


def test_simple_concurrent_teaches_each_user_their_name(example_server):
    out = run_example(example_server, "example_simple_concurrent.py")
    for name in ("Alice", "Bob", "Carol"):
        row = re.search(rf"^{name}\s+(\S+)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+"
                        rf"({NUMBER})\s+'(.*)'$", out, re.M)
        assert row, out
        assert float(row.group(3)) < float(row.group(2)), out  # the loss fell
        assert name in row.group(8), out  # the adapter it just trained answers with the user's name
    assert re.search(rf"concurrency\)", out), out


def test_weight_streaming_prints_both_paths(example_server):
    out = run_example(example_server, "example_weight_streaming.py")
    assert " on cpu " in out
    assert re.search(rf"in-memory handoff .* median\s+{NUMBER} ms", out), out
    assert re.search(rf"disk path .* median\s+{NUMBER} ms", out), out


def test_rl_loop_prints_a_reward_per_step(example_server):
    out = run_example(example_server, "rl_loop.py")
    steps = re.findall(rf"^\s+(\d+)\s+({NUMBER})\s+(\d+)\s+(\d+)\s+{NUMBER}$", out, re.M)
    assert [int(s[0]) for s in steps] == [0, 1, 2], out
    assert all(0.0 <= float(s[1]) <= 1.0 and int(s[2]) == 8 for s in steps), out


def test_stress_test_reports_throughput_latency_and_spread(example_server):
    out = run_example(example_server, "stress_test.py", "--num-requests", "10", "--concurrency", "3")
    assert "ok 10, errors 0" in out, out
    assert re.search(rf"{NUMBER} requests/s\s+{NUMBER} generated tokens/s", out), out
    assert re.search(rf"p50 {NUMBER}s\s+p90 {NUMBER}s\s+p99 {NUMBER}s", out), out
    spread = re.search(r"this server\s+(\d+)", out)
    assert spread and int(spread.group(1)) >= 10, out


@pytest.mark.parametrize("name", ["original_client.py"])
def test_original_client_end_to_end(example_server, name):
    out = run_example(example_server, name)
    losses = [float(x) for x in re.findall(rf"loss ({NUMBER})", out)]
    assert 2 <= len(losses) <= 20 and losses[-1] < 0.1 * losses[0], out
    assert "answer: 'My name is Tinkerbell.'" in out and "remove_lora: deleted" in out, out
    assert re.search(r"checkpoint: tinker://\S+/weights/example", out), out
