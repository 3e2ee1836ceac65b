#!/usr/bin/env bash
# One device call (~8 min on an H100) for issue 5's figures: the fused training ops checked and timed against
# their torch forms, then bench/training_speed.py (checks vs PEFT, 1B and 8B, 8 runs, handoff, profiles) with
# the PEFT and PEFT + Liger peers. Carry .whl (liger-kernel wheel) and install it first, see docs/benchmarks.md.
# With BASELINE_DIR (a tree holding an older `tinkerbell` package), also that tree's 1B run without peers, on
# the same card, for a before/after.
#   bash bench/device_training.sh OUT [MODELS] [BASELINE_DIR]
set -u
out=${1:?OUT}; models=${2:-Llama-3.2-1B,Llama-3.1-8B}; base=${3:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== fused training ops vs torch"
PYTHONPATH=${PYTHONPATH:-}:. timeout 90 python3 bench/train_ops_check.py 2>&1 | grep -v Warn | tee "$out/train_ops.txt"
echo "== training_speed ($models)"
OUT=$out PYTHONPATH=${PYTHONPATH:-}:. timeout ${TRAIN_TIMEOUT:-330} python3 bench/training_speed.py --models "$models" \
  ${TRAIN_ARGS:-} 2>&1 | grep -v Warn | tee "$out/training.txt" | grep -v "^Llama.* {" | tail -60
if [ -n "$base" ]; then
  echo "== baseline ($base): training_speed Llama-3.2-1B, no peers"
  PYTHONPATH=${PYTHONPATH:-}:$base timeout 120 python3 $base/bench/training_speed.py --models Llama-3.2-1B --no-peers \
    --iters 3 2>&1 | grep -v Warn | tee "$out/training_base.txt" | grep -E "ours|runs|handoff|checks" | tail -8
fi
