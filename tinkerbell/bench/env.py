"""Where the benchmark ran: host, GPU and driver, torch, the served model and dtype, the code's git commit;
plus the hardware peaks (memory bandwidth, dense bf16 FLOP/s) that rooflines and MFU divide by."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Datasheet peaks by device-name substring (first match wins, so specific names precede general ones):
# (memory bandwidth bytes/s, dense bf16 tensor FLOP/s). Datasheet, not measured: rooflines are upper bounds.
GPU_PEAKS: list[tuple[str, float, float]] = [
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100", 3.35e12, 989e12),
    ("GH200", 4.0e12, 989e12),
    ("B200", 8.0e12, 2250e12),
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100 80GB PCIe", 1.935e12, 312e12),
    ("A100", 1.555e12, 312e12),
    ("L40S", 0.864e12, 362e12),
    ("L4", 0.3e12, 121e12),
    ("A10G", 0.6e12, 125e12),
    ("A10", 0.6e12, 125e12),
    ("RTX 4090", 1.008e12, 165e12),
    ("RTX 3090", 0.936e12, 71e12),
]

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def gpu_peaks(name: str | None) -> tuple[float, float] | None:
    if not name:
        return None
    for key, bw, flops in GPU_PEAKS:
        if key.lower() in name.lower():
            return bw, flops
    return None


@dataclass
class Environment:
    host: str = ""
    cpu: str = ""
    cpu_cores: int = 0
    python: str = ""
    torch: str = ""
    cuda: str = ""
    gpus: list[str] = field(default_factory=list)
    driver: str = ""
    tinkerbell_commit: str = ""
    server_url: str = ""
    server_started_by_bench: bool = False
    model: str = ""
    model_path: str = ""
    device: str = ""  # as the server reports it (cpu, cuda:0, ...)
    dtype: str = ""
    params: int | None = None  # parameters of the base model, from its safetensors headers
    dp: int = 1
    tp: int = 1
    peak_bandwidth: float | None = None  # bytes/s, per GPU
    peak_flops: float | None = None  # dense bf16 FLOP/s, per GPU

    @property
    def weight_bytes(self) -> float | None:
        if self.params is None:
            return None
        return self.params * _DTYPE_BYTES.get(self.dtype, 2)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"weight_bytes": self.weight_bytes}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi() -> tuple[list[str], str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], ""
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.SubprocessError):
        return [], ""
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    return [f"{r[0]} ({r[2]})" if len(r) > 2 else r[0] for r in rows], (rows[0][1] if rows and len(rows[0]) > 1 else "")


def git_commit() -> str:
    """The commit of the tinkerbell checkout this code runs from, '+dirty' when it has local changes."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return ""
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("+dirty" if dirty and sha else "")


def count_params(model_path: str | Path | None) -> int | None:
    """Parameters in a local HF folder's *.safetensors, read from the headers only (no tensor is loaded)."""
    if not model_path:
        return None
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                size = 1
                for d in v["shape"]:
                    size *= d
                total += size
    return total


def local_model_path(model: str | None) -> str | None:
    """The folder holding `model` (a folder, or an HF id in the local cache), None when not on this machine."""
    if not model:
        return None
    if Path(model).is_dir():
        return str(Path(model).resolve())
    try:
        from tinkerbell.engine.models.loader import resolve_model_path

        return str(resolve_model_path(model, allow_download=False))
    except Exception:  # noqa: BLE001 - not cached here: no peer, no roofline, the rest still runs
        return None


def collect(server_info: dict[str, Any], url: str, started: bool, model_path: str | None, dp: int,
            tp: int) -> Environment:
    try:
        import torch

        torch_version = torch.__version__
        cuda = torch.version.cuda or ""
    except ImportError:
        torch_version, cuda = "", ""
    gpus, driver = _nvidia_smi()
    env = Environment(host=platform.node(), cpu=_cpu_name(), cpu_cores=os.cpu_count() or 0,
                      python=platform.python_version(), torch=torch_version, cuda=cuda, gpus=gpus, driver=driver,
                      tinkerbell_commit=git_commit(), server_url=url, server_started_by_bench=started,
                      model=str(server_info.get("model_name", "")), model_path=model_path or "",
                      device=str(server_info.get("device", "")), dtype=str(server_info.get("dtype", "")),
                      params=count_params(model_path), dp=dp, tp=tp)
    if env.on_gpu and gpus:
        peaks = gpu_peaks(gpus[0])
        if peaks:
            env.peak_bandwidth, env.peak_flops = peaks
    return env
