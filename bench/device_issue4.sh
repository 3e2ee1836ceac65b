#!/usr/bin/env bash
# One device call for issue 4's sampler figures: the baseline tree (if given) and this tree, same card.
#   bash bench/device_issue4.sh OUT [BASELINE_DIR]
# PDL_AB=1 adds this tree's batch-1 step with programmatic dependent launch off, on, and on with the GEMV's
# weight prefetch (TINKERBELL_PDL, TINKERBELL_GEMV_PREFETCH);
# NO_SPEED=1 skips the full table; PROBE=1 adds decode_probe's kernel breakdowns; BASE8B=1 the baseline's 8B 256x128/128 run.
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
if [ -n "${PDL_AB:-}" ]; then
  for v in "0 0" "1 0" "1 1"; do
    set -- $v
    echo "== this tree, TINKERBELL_PDL=$1 TINKERBELL_GEMV_PREFETCH=$2: 1B batch-1 step"
    TINKERBELL_PDL=$1 TINKERBELL_GEMV_PREFETCH=$2 PYTHONPATH=. timeout 120 python3 bench/decode_probe.py --only 2 \
      2>&1 | grep -v Warn | tee "$out/pdl$1$2.txt" | head -30
  done
fi
if [ -n "${PROBE:-}" ]; then
  echo "== this tree: 1B batch-1 step, 8B decode step by kernel"
  PYTHONPATH=. timeout 150 python3 bench/decode_probe.py --only 24 2>&1 | grep -v Warn | tee "$out/new.txt"
fi
[ -n "${NO_SPEED:-}" ] && exit 0
echo "== this tree: bench/sampling_speed.py (checks, figures, HF peer)"
PYTHONPATH=. timeout ${SPEED_TIMEOUT:-330} python3 bench/sampling_speed.py --json "$out/report.json" --profile-dir "$out" \
  $SPEED_ARGS 2>&1 | tee "$out/speed.txt" | tail -40
