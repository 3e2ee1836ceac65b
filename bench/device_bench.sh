#!/usr/bin/env bash
# One-GPU run of `tinkerbell bench` on a random-weight Llama-3.2-1B (the docs/benchmarks.md "bench" table).
# Usage: bench/device_bench.sh OUT_DIR [quick_timeout_s] [full_timeout_s]
set -u
out=${1:?OUT_DIR}; tq=${2:-200}; tf=${3:-300}
ckpt=/tmp/llama-3.2-1b-random
python3 bench/make_random_checkpoint.py "$ckpt" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== quick: every scenario"
timeout "$tq" python3 -m tinkerbell bench --model "$ckpt" --dtype bfloat16 --gpu-memory-util 0.5 --quick \
  --scaling-dp 1,2 --out /tmp/bench-quick --no-progress 2>&1 | tail -25
mkdir -p "$out/quick" "$out/full"
cp /tmp/bench-quick/report.md /tmp/bench-quick/results.json "$out/quick/" 2>/dev/null
echo "== full: sampling, concurrency, scaling (DP 1 and 2 on one GPU)"
timeout "$tf" python3 -m tinkerbell bench --model "$ckpt" --dtype bfloat16 --gpu-memory-util 0.3 \
  --scenarios sampling,concurrency,scaling --scaling-dp 1,2 --out /tmp/bench-full --no-progress 2>&1 | tail -25
cp /tmp/bench-full/report.md /tmp/bench-full/results.json /tmp/bench-full/concurrency.png \
   /tmp/bench-full/scaling.png /tmp/bench-full/sampling_latency_cdf.png "$out/full/" 2>/dev/null
ls -la "$out"/*
