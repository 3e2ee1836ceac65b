#!/usr/bin/env bash
# Issue 13's figures (LLaDA-8B shape, random weights) in one device call (~6 min on an H100; QUICK=1: (a)-(d)
# only, ~4 min). Carry .whl (the server's wheels, docs/benchmarks.md lists them): installed into /tmp/site first.
# The table goes to OUT/diffusion.txt; each HTTP wave's line says what the sampler did meanwhile (steps,
# forwards a step, graph replays and captures): compare with the in-process figure.
#   bash bench/device_issue13.sh OUT
set -u
out=${1:?OUT}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/site .whl/*.whl >"$out/wheels.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
quick=
[ "${QUICK:-0}" = 1 ] && quick=--quick
PYTHONPATH=${PYTHONPATH:-}:. timeout "${DIFFUSION_TIMEOUT:-540}" python3 bench/diffusion_http.py $quick 2>&1 \
  | grep -v Warn | tee "$out/diffusion.txt" | tail -40
