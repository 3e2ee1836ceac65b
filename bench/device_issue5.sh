#!/usr/bin/env bash
# Issue 5's figures in one device call (~9 min on an H100), most important first, so a call cut short still
# returns them: the fused training ops and the several-run LoRA forms checked against float32 (train_ops_check),
# training_speed (1B and 8B; 8 runs exact vs stacked; profiles), the seed loop, then the sampler's GPU checks
# (the decode path shares a RoPE helper with training). Carry .whl (the server's and SDK's wheels plus
# liger-kernel; docs/benchmarks.md lists them): they are installed into /tmp/site first.
#   bash bench/device_issue5.sh OUT [MODELS]        (PEERS=1 also runs PEFT and PEFT + Liger)
set -u
out=${1:?OUT}; models=${2:-Llama-3.2-1B,Llama-3.1-8B}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/site .whl/*.whl >"$out/wheels.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
peers=--no-peers
[ "${PEERS:-0}" = 1 ] && peers=
TRAIN_ARGS="$peers --iters 3" TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-260} bash bench/device_training.sh "$out" "$models"
echo "== seed loop"
SEED_TIMEOUT=${SEED_TIMEOUT:-130} bash bench/device_seed_loop.sh "$out"
echo "== sampler GPU checks (sampling_speed --quick, 1B)"
PYTHONPATH=${PYTHONPATH:-}:. timeout 90 python3 bench/sampling_speed.py --quick --skip-8b --skip-hf \
  --json "$out/sampling_quick.json" 2>&1 | grep -v Warn | tail -22
