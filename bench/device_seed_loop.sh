#!/usr/bin/env bash
# One device step for issue 5's seed-loop figure: a random-weight Llama-3.2-1B checkpoint, then bench/seed_loop.py
# (3 users x (forward_backward + optim_step + handoff + sample 4x128) through the tinker SDK on a real server).
# The device image lacks the server's and the SDK's packages: carry their wheels in .whl/ and install them first
# (docs/benchmarks.md lists them).
#   bash bench/device_seed_loop.sh OUT
set -u
out=${1:?OUT}
export PYTHONUNBUFFERED=1 TINKER_TELEMETRY=0
ckpt=/tmp/llama-3.2-1b-random
PYTHONPATH=${PYTHONPATH:-}:. python3 bench/make_random_checkpoint.py "$ckpt" >"$out/seed_ckpt.log" 2>&1 &&
  PYTHONPATH=${PYTHONPATH:-}:. python3 -m tinkerbell.bench.vocab "$ckpt" >>"$out/seed_ckpt.log" 2>&1 ||
  { tail -20 "$out/seed_ckpt.log"; exit 1; }
PYTHONPATH=${PYTHONPATH:-}:. timeout ${SEED_TIMEOUT:-240} python3 bench/seed_loop.py --model "$ckpt" \
  --json "$out/seed_loop.json" 2>&1 | grep -v Warn | tail -25
