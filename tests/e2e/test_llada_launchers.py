"""The LLaDA launchers: --dry-run prints the SLURM job script / command, and what they would run is a command
line `tinkerbell serve` accepts."""

import os
import shlex
import subprocess
from pathlib import Path

from tinkerbell.cli import config_from_args

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=30)


def _serve_args(line: str) -> list[str]:
    words = shlex.split(line)
    return words[words.index("serve") + 1:]


def test_slurm_job_script(tmp_path):
    out = _run("start_llada_batch_server.sh", "--gpus", "2", "--dcp-path", str(tmp_path), "--base-model", "M",
               "--algorithm", "dual_cache", "--batch-size", "8", "--max-wait-time", "0.2", "--port", "9001",
               "--partition", "gpu", "--time", "01:00:00", "--job-name", "ll", "--dry-run",
               env={"ACCOUNT": "acct42"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for directive in ("--account=acct42", "--gres=gpu:2", "--time=01:00:00", "--partition=gpu", "--job-name=ll"):
        assert f"#SBATCH {directive}" in lines
    exec_line = next(l for l in lines if l.startswith("exec "))
    args = _serve_args(exec_line)
    cfg = config_from_args([a for a in args if a not in ("--dp", "2")], environ={})
    assert (cfg.model, str(cfg.dcp_path), cfg.algorithm, cfg.batch_size, cfg.max_wait_time, cfg.port) == \
        ("M", str(tmp_path), "dual_cache", 8, 0.2, 9001)
    assert "--dp 2" in exec_line


def test_local_command_and_errors():
    out = _run("start_llada_batch_server.sh", "--local", "--model-path", "/models/llada", "--dry-run")
    assert out.returncode == 0 and config_from_args(_serve_args(out.stdout), environ={}).model == "/models/llada"
    assert _run("start_llada_batch_server.sh", "--dcp-path", "/x", "--local", "--dry-run").returncode == 2
    no_account = _run("start_llada_batch_server.sh", "--model-path", "/m", env={"ACCOUNT": ""})
    assert no_account.returncode == 2 and "ACCOUNT" in no_account.stderr


def test_multi_gpu_launcher():
    out = _run("start_multi_gpu_server.sh", "--gpu-ids", "0,2,4,6", "--port", "8100", "--worker-base-port", "8101",
               "--model", "/m", "--algorithm", "prefix_cache", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("CUDA_VISIBLE_DEVICES=0,2,4,6 ") and "--dp 4" in out.stdout
    bad = _run("start_multi_gpu_server.sh", "--port", "8100", "--worker-base-port", "9000", "--dry-run")
    assert bad.returncode == 2
