#!/usr/bin/env bash
# One device call (~8 min on an H100) for issue 5's figures: the fused training ops checked and timed against
# their torch forms, then bench/training_speed.py (checks vs PEFT, 1B and 8B, 8 runs, handoff, profiles) with
# the PEFT and PEFT + Liger peers. Carry .whl (liger-kernel wheel) and install it first, see docs/benchmarks.md.
#   bash bench/device_training.sh OUT [MODELS]
set -u
out=${1:?OUT}; models=${2:-Llama-3.2-1B,Llama-3.1-8B}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== fused training ops vs torch"
PYTHONPATH=${PYTHONPATH:-}:. timeout 120 python3 bench/train_ops_check.py 2>&1 | grep -v Warn | tee "$out/train_ops.txt"
echo "== training_speed ($models)"
OUT=$out PYTHONPATH=${PYTHONPATH:-}:. timeout ${TRAIN_TIMEOUT:-420} python3 bench/training_speed.py --models "$models" \
  ${TRAIN_ARGS:-} 2>&1 | grep -v Warn | tee "$out/training.txt" | grep -v "^Llama.* {" | tail -60
