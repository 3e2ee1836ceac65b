"""report.md and results.json of one run. results.json is the stable record (`bench compare` reads it);
report.md is its human rendering: environment first, then each scenario's tables, notes and plots."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinkerbell.bench.context import ScenarioResult, Table
from tinkerbell.bench.env import Environment
from tinkerbell.bench.metrics import fmt

SCHEMA = "tinkerbell-bench/1"


@dataclass
class Run:
    created: str
    command: str
    quick: bool
    environment: Environment
    sizes: dict[str, Any]
    scenarios: list[ScenarioResult]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "created": self.created, "command": self.command, "quick": self.quick,
                "seconds": round(self.seconds, 2), "environment": self.environment.to_dict(), "sizes": self.sizes,
                "scenarios": {s.name: s.to_dict() for s in self.scenarios}}


def _json_safe(v: Any) -> Any:
    """NaN/inf are not JSON: store them as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def markdown_table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(x: Any) -> str:
        return (fmt(x) if isinstance(x, float) or x is None else str(x)).replace("|", "\\|")

    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
        ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]


def _env_rows(env: Environment) -> list[list[str]]:
    gpu = "; ".join(env.gpus) if env.gpus else "none (CPU)"
    size = f"{env.params / 1e6:,.1f}M parameters" if env.params else "unknown size (no local folder)"
    peaks = (f"{env.peak_bandwidth / 1e12:.2f} TB/s, {env.peak_flops / 1e12:,.0f} TFLOP/s dense bf16 (datasheet)"
             if env.peak_bandwidth and env.peak_flops else "—")
    return [["server", f"{env.server_url} ({'started by bench' if env.server_started_by_bench else 'given'}), "
                       f"DP {env.dp}, TP {env.tp}"],
            ["model", f"{env.model} ({size})"], ["device, dtype", f"{env.device or '?'}, {env.dtype or '?'}"],
            ["GPU (bench host)", gpu], ["driver, CUDA", f"{env.driver or '—'}, {env.cuda or '—'}"],
            ["hardware peaks", peaks], ["CPU", f"{env.cpu} ({env.cpu_cores} cores)"],
            ["torch, python", f"{env.torch or '—'}, {env.python}"], ["tinkerbell commit", env.tinkerbell_commit or "—"],
            ["host", env.host]]


def render(run: Run) -> str:
    out = [f"# Tinkerbell benchmark — {run.created}", "",
           f"`{run.command}` ({'quick' if run.quick else 'full'} mode, {run.seconds:.0f} s). Every figure below "
           "was measured in this run; peer figures come from the same machine in the same run.", "",
           "## Environment", "", *markdown_table(["", ""], _env_rows(run.environment)), "", "## Summary", ""]
    out += markdown_table(["scenario", "status", "seconds", "note"],
                          [[s.name, s.status, f"{s.seconds:.1f}", s.reason] for s in run.scenarios])
    for s in run.scenarios:
        out += ["", f"## {s.name}", ""]
        if s.status != "ok":
            out += [f"*{s.status}*: {s.reason}"]
            continue
        for t in s.tables:
            out += _table(t)
        for n in s.notes:
            out += [f"- {n}"]
        if s.notes:
            out.append("")
        for p in s.plots:
            out += [f"![{s.name}]({p})", ""]
    return "\n".join(out).rstrip() + "\n"


def _table(t: Table) -> list[str]:
    lines = [f"### {t.title}", "", *markdown_table(t.columns, t.rows), ""]
    if t.note:
        lines += [t.note, ""]
    return lines


def write(run: Run, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "results.json"
    js.write_text(json.dumps(_json_safe(run.to_dict()), indent=1, sort_keys=False) + "\n")
    md = out_dir / "report.md"
    md.write_text(render(run))
    return md, js
