#!/usr/bin/env bash
# One device call for issue 4's sampler figures: the baseline tree (if given) and this tree, same card.
#   bash bench/device_issue4.sh OUT [BASELINE_DIR]      (PROBE=1 adds decode_probe's kernel breakdowns)
set -u
SPEED_ARGS=${SPEED_ARGS:-}
out=${1:?OUT}; base=${2:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ -n "$base" ]; then
  echo "== baseline ($base): 1B batch-1 step (BASE8B=1: and 8B 256x128/128)"
  PYTHONPATH=$base timeout 150 python3 bench/decode_probe.py --only 2${BASE8B:+3} 2>&1 | grep -v Warn \
    | tee "$out/base.txt"
fi
if [ -n "${PROBE:-}" ]; then
  echo "== this tree: 1B batch-1 step, 8B decode step by kernel"
  PYTHONPATH=. timeout 150 python3 bench/decode_probe.py --only 24 2>&1 | grep -v Warn | tee "$out/new.txt"
fi
echo "== this tree: bench/sampling_speed.py (checks, figures, HF peer)"
PYTHONPATH=. timeout 330 python3 bench/sampling_speed.py --json "$out/report.json" --profile-dir "$out" $SPEED_ARGS 2>&1 \
  | tee "$out/speed.txt" | tail -40
