"""results.json round trip and `tinkerbell bench compare`."""

from __future__ import annotations

import json

from tinkerbell.bench import compare
from tinkerbell.bench.cli import run_from
from tinkerbell.bench.context import ScenarioResult, Sizes, Table
from tinkerbell.bench.env import Environment
from tinkerbell.bench.report import SCHEMA, Run, write


def _run(tok_s: float, ttft: float, tmp_path, name: str):
    s = ScenarioResult("sampling", tables=[Table("t", ["a", "b"], [[1, 2.5]])],
                       metrics={"fixed.output_tok_s": tok_s, "fixed.ttft_ms_p50": ttft, "fixed.missing": None,
                                "fixed.nan": float("nan")})
    skipped = ScenarioResult("scaling", status="skipped", reason="needs --model", metrics={"dp1.output_tok_s": 9.0})
    out = tmp_path / name
    write(Run("2026-01-01 00:00 UTC", "tinkerbell bench", True, Environment(model="m"), Sizes.quick().to_dict(),
              [s, skipped]), out)
    return out


def test_results_json_is_strict_json(tmp_path):
    out = _run(100.0, 50.0, tmp_path, "a")
    text = (out / "results.json").read_text()
    assert "NaN" not in text  # NaN is not JSON; stored as null
    data = json.loads(text)
    assert data["schema"] == SCHEMA and data["scenarios"]["sampling"]["metrics"]["fixed.nan"] is None
    assert "| a | b |" in (out / "report.md").read_text()


def test_compare_table_and_verdicts(tmp_path, capsys):
    a, b = _run(100.0, 50.0, tmp_path, "a"), _run(150.0, 40.0, tmp_path, "b")
    rows = {r[0]: r for r in compare.rows(compare.load(a), compare.load(b / "results.json"))}
    assert rows["sampling.fixed.output_tok_s"][3:] == ["+50.0%", "better"]
    assert rows["sampling.fixed.ttft_ms_p50"][3:] == ["-20.0%", "better"]
    assert rows["sampling.fixed.missing"][3] == "—"
    assert not any(k.startswith("scaling.") for k in rows)  # a skipped scenario has no figures to compare
    assert run_from(["compare", str(a / "results.json"), str(b)]) == 0
    out = capsys.readouterr().out
    assert "sampling.fixed.output_tok_s" in out and "+50.0%" in out and out.startswith("A: ")


def test_compare_refuses_other_files(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"schema": "something-else"}')
    a = _run(1.0, 1.0, tmp_path, "a")
    assert run_from(["compare", str(a), str(bad)]) == 2
    assert "not a tinkerbell bench results file" in capsys.readouterr().err
    assert run_from(["compare", str(a)]) == 2


def test_direction():
    assert compare.direction("sampling.fixed.output_tok_s") == 1
    assert compare.direction("mixed.slowdown_p99") == -1
    assert compare.direction("concurrency.c4.e2e_ms_p50") == -1
    assert compare.direction("concurrency.peak_at_clients") == 0
