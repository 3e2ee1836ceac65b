"""`tinkerbell bench compare A.json B.json`: every metric both runs measured, side by side, with the change
from A to B and whether that change is an improvement (throughput up, latency down)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tinkerbell.bench.metrics import fmt
from tinkerbell.bench.report import SCHEMA

_HIGHER = ("tok_s", "req_s", "speedup", "efficiency", "mfu", "vs_base", "ratio_vs_peer", "requests")
_LOWER = ("_ms", "ms_p", "slowdown", "errors", "wall_s", "handoff_s")


class CompareError(ValueError):
    pass


def load(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{path}: cannot read a results.json ({e})") from None
    if data.get("schema") != SCHEMA:
        raise CompareError(f"{path}: not a tinkerbell bench results file (schema {data.get('schema')!r})")
    return data


def flatten(data: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, s in data.get("scenarios", {}).items():
        if s.get("status") == "ok":
            for k, v in s.get("metrics", {}).items():
                out[f"{name}.{k}"] = v
    return out


def direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when neither (sizes, counts of context)."""
    if any(k in metric for k in _LOWER):
        return -1
    if any(metric.endswith(k) or f".{k}" in metric for k in _HIGHER):
        return 1
    return 0


def rows(a: dict[str, Any], b: dict[str, Any]) -> list[list[str]]:
    fa, fb = flatten(a), flatten(b)
    out = []
    for k in [*fa, *(k for k in fb if k not in fa)]:
        va, vb = fa.get(k), fb.get(k)
        change, verdict = "—", ""
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va and math.isfinite(va):
            pct = 100.0 * (vb - va) / abs(va)
            change = f"{pct:+.1f}%"
            d = direction(k)
            if d and abs(pct) >= 1.0:
                verdict = "better" if pct * d > 0 else "worse"
        out.append([k, fmt(va, 2), fmt(vb, 2), change, verdict])
    return out


def render(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> str:
    def env_line(d: dict[str, Any]) -> str:
        e = d.get("environment", {})
        where = "; ".join(e.get("gpus") or []) or "CPU"
        return f"{d.get('created', '?')}, {e.get('model', '?')} on {where}, commit {e.get('tinkerbell_commit') or '?'}"

    table = [["metric", "A", "B", "change", ""], *rows(a, b)]
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines = [f"A: {name_a} ({env_line(a)})", f"B: {name_b} ({env_line(b)})", ""]
    for i, r in enumerate(table):
        lines.append("  ".join(c.rjust(w) if 0 < j < 4 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
                     .rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if a.get("quick") != b.get("quick"):
        lines += ["", "note: one run is --quick and the other is not; their workloads differ."]
    return "\n".join(lines)


def main(path_a: str, path_b: str) -> int:
    print(render(load(path_a), load(path_b), path_a, path_b))
    return 0
