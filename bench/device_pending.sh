#!/usr/bin/env bash
# One device call (~6 min on an H100) for what the fourth session built and no machine was lent to measure:
#   bash bench/device_pending.sh OUT
# 1. PDL A/B: the 1B batch-1 decode step with programmatic dependent launch off / on / on + GEMV weight prefetch.
# 2. PDL checks: the kernel checks and the batch-1 greedy check (fast async == reference, float32) with PDL on.
# 3. Training 1B without peers: the train→sampler handoff (`handoff (snap+slot)`, target 5 ms) and tokens/s.
# If (1) shows PDL faster and (2) passes, make it the default (kernels/__init__.py) and rerun the issue's table:
#   SPEED_ARGS=--skip-hf-batch bash bench/device_issue4.sh OUT     (on an H100)
set -u
out=${1:?OUT}
export PYTHONUNBUFFERED=1
PDL_AB=1 NO_SPEED=1 bash bench/device_issue4.sh "$out"
echo "== PDL on: kernel and greedy checks (quick)"
TINKERBELL_PDL=1 PYTHONPATH=. timeout 120 python3 bench/sampling_speed.py --quick --skip-8b --skip-hf \
  --json "$out/pdl_checks.json" 2>&1 | tee "$out/pdl_checks.txt" | grep -E "PASS|FAIL|tok/s" | head -30
[ -n "${NO_TRAIN:-}" ] && exit 0  # NO_TRAIN=1: bench/device_training.sh covers the training run
echo "== training 1B (handoff, tokens/s, profile)"
PYTHONPATH=. timeout 180 python3 bench/training_speed.py --models Llama-3.2-1B --no-peers --iters 3 2>&1 \
  | grep -v Warn | tee "$out/training.txt" | tail -30
