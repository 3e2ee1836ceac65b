"""PNG plots of a run, drawn from the scenarios' series (matplotlib, Agg: no display needed). Small figures at
a modest DPI so reports can be committed under docs/."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tinkerbell.bench.context import ScenarioResult
from tinkerbell.bench.metrics import cdf

SIZE, DPI = (6.4, 3.6), 100


def _figure(rows: int = 1, cols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(SIZE[0] * (1 if cols == 1 else 0.75 * cols), SIZE[1]), dpi=DPI)
    return fig, axes


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path.name


def _cdf_axes(ax: Any, curves: dict[str, list[float]], xlabel: str) -> None:
    for label, values in curves.items():
        if values:
            xs, ys = cdf(values)
            ax.step(xs, ys, where="post", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def sampling(res: ScenarioResult, out: Path) -> list[str]:
    series = res.series.get("cdf", {})
    fig, (a, b) = _figure(1, 2)
    _cdf_axes(a, {k.split(",")[0]: v["ttft_ms"] for k, v in series.items()}, "time to first token (ms)")
    _cdf_axes(b, {k.split(",")[0]: v["e2e_ms"] for k, v in series.items()}, "end-to-end latency (ms)")
    fig.suptitle("Sampling latency CDFs", fontsize=10)
    return [_save(fig, out / "sampling_latency_cdf.png")]


def concurrency(res: ScenarioResult, out: Path) -> list[str]:
    pts = res.series.get("points", [])
    fig, (a, b) = _figure(1, 2)
    c = [p["clients"] for p in pts]
    a.plot(c, [p["output_tok_s"] for p in pts], marker="o")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrent clients")
    a.set_ylabel("output tokens/s")
    a.grid(alpha=0.3)
    b.plot([p["e2e_ms_p50"] for p in pts], [p["output_tok_s"] for p in pts], marker="o", label="p50")
    b.plot([p["e2e_ms_p99"] for p in pts], [p["output_tok_s"] for p in pts], marker="s", label="p99")
    for p in pts:
        b.annotate(str(p["clients"]), (p["e2e_ms_p50"], p["output_tok_s"]), fontsize=7)
    b.set_xlabel("request latency (ms)")
    b.set_ylabel("output tokens/s")
    b.grid(alpha=0.3)
    b.legend(fontsize=7)
    fig.suptitle("Throughput vs concurrency", fontsize=10)
    return [_save(fig, out / "concurrency.png")]


def mixed(res: ScenarioResult, out: Path) -> list[str]:
    fig, ax = _figure()
    _cdf_axes(ax, res.series.get("cdf", {}), "short request latency (ms)")
    ax.set_title("Head-of-line blocking: short requests", fontsize=10)
    return [_save(fig, out / "mixed_latency_cdf.png")]


def lora(res: ScenarioResult, out: Path) -> list[str]:
    pts = res.series.get("points", [])
    fig, ax = _figure()
    labels = ["base" if p["adapters"] == 0 else str(p["adapters"]) for p in pts]
    ax.bar(labels, [p["output_tok_s"] for p in pts], color="tab:blue")
    ax.set_xlabel("adapters in the mix")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Multi-LoRA sampling throughput", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return [_save(fig, out / "lora.png")]


def training(res: ScenarioResult, out: Path) -> list[str]:
    fig, ax = _figure()
    for label, losses in res.series.get("loss_curves", {}).items():
        ax.plot(range(1, len(losses) + 1), losses, marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per token)")
    ax.set_title("Training curves", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return [_save(fig, out / "training_loss.png")]


def scaling(res: ScenarioResult, out: Path) -> list[str]:
    pts = res.series.get("points", [])
    fig, (a, b) = _figure(1, 2)
    labels = [f"DP {p['dp']}" for p in pts]
    a.bar(labels, [p["output_tok_s"] for p in pts], color="tab:green")
    a.set_ylabel("output tokens/s")
    a.grid(alpha=0.3, axis="y")
    b.bar(labels, [p["speedup"] or 0 for p in pts], color="tab:orange", label="measured")
    b.plot(labels, [p["dp"] / pts[0]["dp"] for p in pts], "k--", marker="o", label="linear")
    b.set_ylabel("speedup")
    b.legend(fontsize=7)
    b.grid(alpha=0.3, axis="y")
    fig.suptitle("Data-parallel scaling", fontsize=10)
    return [_save(fig, out / "scaling.png")]


PLOTTERS: dict[str, Callable[[ScenarioResult, Path], list[str]]] = {
    "sampling": sampling, "concurrency": concurrency, "mixed": mixed, "lora": lora, "training": training,
    "scaling": scaling}


def draw(res: ScenarioResult, out: Path) -> list[str]:
    """The scenario's PNGs (file names); a plotting failure is a note in the report, never a lost run."""
    if res.status != "ok" or res.name not in PLOTTERS:
        return []
    try:
        return PLOTTERS[res.name](res, out)
    except Exception as e:  # noqa: BLE001
        res.notes.append(f"plot failed: {type(e).__name__}: {e}")
        return []
