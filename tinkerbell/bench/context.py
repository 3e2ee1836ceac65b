"""What scenarios share: workload sizes (quick vs full), the target server, and the result dataclasses that
report.py renders and results.json stores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tinkerbell.bench.env import Environment
    from tinkerbell.bench.peer import Peer
    from tinkerbell.bench.server import ServerLauncher

SCENARIOS = ("sampling", "concurrency", "mixed", "lora", "training", "scaling")


@dataclass
class Sizes:
    """Every workload knob in one place, so --quick and full mode differ only here.

    Full mode is sized for one H100 and a 1B model: about a minute for sampling and for concurrency, and at
    most about two for lora, training and scaling each (scaling starts a server per DP size, ~40 s each), so
    `bench/device_bench.sh` runs sampling, concurrency, lora, training and scaling with the peers within one
    9-minute device command. Larger models take longer in proportion."""
    # sampling: one request at a time (batch-1 decode), a fixed batch, a length distribution
    single_in: int = 128
    single_out: int = 256
    single_requests: int = 5
    fixed_in: int = 512
    fixed_out: int = 256
    fixed_requests: int = 256
    fixed_concurrency: int = 64
    dist_requests: int = 512
    dist_concurrency: int = 64
    dist_in_median: int = 256
    dist_in_max: int = 2048
    dist_out_median: int = 128
    dist_out_max: int = 1024
    # concurrency sweep
    sweep: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    sweep_in: int = 256
    sweep_out: int = 128
    sweep_min_requests: int = 16
    # mixed: short requests alone, then beside long ones
    short_in: int = 64
    short_out: int = 32
    short_requests: int = 64
    short_concurrency: int = 4
    long_in: int = 1536
    long_out: int = 256
    long_concurrency: int = 8
    # lora
    lora_counts: tuple[int, ...] = (1, 4, 16, 64)
    lora_trained: int = 4  # distinct adapters trained; more names register the same checkpoints again
    lora_rank: int = 16
    lora_requests: int = 128  # two waves at concurrency 64, at each of five adapter counts
    lora_concurrency: int = 64
    lora_in: int = 128
    lora_out: int = 128
    # training
    train_users: int = 4
    train_steps: int = 10
    train_batch: int = 8
    train_seq: int = 512
    train_rank: int = 16
    train_lr: float = 1e-4
    probe_requests: int = 32  # sampling latency probes, idle and while training
    probe_in: int = 64
    probe_out: int = 32
    rl_prompts: int = 8
    rl_samples: int = 8
    rl_out: int = 128
    # scaling
    scaling_requests: int = 256
    scaling_concurrency: int = 128
    scaling_in: int = 256
    scaling_out: int = 128
    # peer (HF transformers / PEFT, in-process)
    peer_batch: int = 32
    peer_out_max: int = 64  # HF generate decodes ~10-15 tok/s per step on a GPU: 64 steps measure it
    peer_train_steps: int = 5

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(single_in=16, single_out=16, single_requests=3, fixed_in=32, fixed_out=16, fixed_requests=16,
                   fixed_concurrency=4, dist_requests=16, dist_concurrency=4, dist_in_median=24, dist_in_max=96,
                   dist_out_median=12, dist_out_max=32, sweep=(1, 4, 16), sweep_in=32, sweep_out=16,
                   sweep_min_requests=8, short_in=16, short_out=8, short_requests=12, short_concurrency=2,
                   long_in=384, long_out=48, long_concurrency=2, lora_counts=(1, 4), lora_trained=2, lora_rank=8,
                   lora_requests=16, lora_concurrency=4, lora_in=32, lora_out=16, train_users=2, train_steps=4,
                   train_batch=2, train_seq=64, train_rank=8, train_lr=1e-2, probe_requests=6, probe_in=16,
                   probe_out=8, rl_prompts=2, rl_samples=4, rl_out=16, scaling_requests=16, scaling_concurrency=8,
                   scaling_in=32, scaling_out=16, peer_batch=4, peer_out_max=16, peer_train_steps=3)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "note": self.note}


@dataclass
class ScenarioResult:
    name: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    seconds: float = 0.0
    tables: list[Table] = field(default_factory=list)
    metrics: dict[str, float | None] = field(default_factory=dict)  # flat, for `bench compare`
    series: dict[str, Any] = field(default_factory=dict)  # raw points the plots draw
    plots: list[str] = field(default_factory=list)  # PNG file names under the report folder
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason, "seconds": round(self.seconds, 2),
                "tables": [t.to_dict() for t in self.tables], "metrics": self.metrics, "series": self.series,
                "plots": self.plots, "notes": self.notes}


@dataclass
class Target:
    """The server under test as clients see it."""
    url: str
    api_key: str
    model: str  # the base model's served name
    info: dict[str, Any] = field(default_factory=dict)  # /get_info: device, dtype, vocab, context, max_loras

    @property
    def vocab_size(self) -> int:
        return int(self.info.get("vocab_size") or 32000)

    @property
    def max_context(self) -> int:
        return int(self.info.get("max_context_length") or 2048)


@dataclass
class Context:
    target: Target
    sizes: Sizes
    quick: bool
    out_dir: Path
    env: "Environment"
    progress: bool = True
    peer: "Peer | None" = None
    launcher: "ServerLauncher | None" = None  # set when bench started the server: scaling starts more
    scaling_dp: tuple[int, ...] = ()
    seed: int = 0
