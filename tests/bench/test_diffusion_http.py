"""bench/diffusion_http.py's CPU smoke mode, run for real: it measures every figure of the device table (the
plain reference loop in process, `tinkerbell serve --dp 1` and `--dp 2` of the checkpoint it writes, driven over
HTTP) and its correctness checks pass: our `basic` gives the reference's tokens, in process and through HTTP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_mode_measures_every_figure_and_matches_the_reference(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "bench/diffusion_http.py", "--small", "--device", "cpu",
                        "--algorithms", "basic,dual_cache", "--checkpoint", str(tmp_path / "ckpt")],
                       capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out = r.stdout
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| \(([a-e])\) .*$", out, re.M)}
    assert sorted(rows) == list("abcde"), out
    for key in "abc":  # reference, basic, dual_cache: all measured
        assert len(re.findall(r"\| \d+\.\d+ ", rows[key])) == 3, rows[key]
    assert re.search(r"dp 1: \d+\.\d+ \| dp 2: \d+\.\d+ = \d+\.\d+x", rows["e"]), rows["e"]
    assert "ours basic == reference tokens: yes" in out
    assert "in process, basic vs reference, 4 prompts: 4/4 sequences" in out
    # Through HTTP the 4 requests arrive staggered and join the running batch at block boundaries, so rows are
    # computed in other batch shapes than the reference's; float32 sums then differ in the last bits and a
    # near-tie of the random tiny model can flip (seen once in a loaded full run): one sequence may differ.
    served = re.search(r"through HTTP \(dp 1\), basic vs reference: (\d)/4 sequences, (\d+)/(\d+) tokens", out)
    assert served and int(served.group(1)) >= 3 and int(served.group(2)) >= 0.75 * int(served.group(3)), out[-2000:]
    assert (tmp_path / "ckpt" / "config.json").exists()  # --checkpoint keeps what it wrote
