#!/usr/bin/env bash
# One-GPU run of `tinkerbell bench` on a random-weight Llama-3.2-1B (the docs/benchmarks.md "bench" tables), in
# one device command of at most ~9 minutes.
#
# Usage: bench/device_bench.sh OUT_DIR [full|quick] [timeout_s]
#   full  (default): sampling, concurrency, lora, training and scaling (DP 1 and 2 sharing the GPU), full sizes,
#                    HF transformers / PEFT peers in the same run; ~7 min on one H100 (estimate: see
#                    tinkerbell/bench/context.py Sizes), capped at timeout_s (default 480).
#   quick:           every scenario in quick mode (~2 min).
# OUT_DIR gets at most 8 files, no folders: report.md, results.json, the PNGs, bench.log (the command's output,
# with the server log's tail if the run failed). The report is rewritten after every scenario, so a run cut off
# by the time limit still leaves the scenarios it finished.
#
# Needs on the device: torch, transformers, peft, tinker, openai, matplotlib. The tinker SDK needs `h2`; when
# the device lacks it, carry the wheels in .whl/ (h2, hpack, hyperframe): they are installed into /tmp/site.
set -u
out=${1:?OUT_DIR}; mode=${2:-full}; limit=${3:-480}
mkdir -p "$out"
log="$out/bench.log"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import h2" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/site .whl/*.whl >>"$log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
ckpt=/tmp/llama-3.2-1b-random
t0=$(date +%s)
{ python3 bench/make_random_checkpoint.py "$ckpt" &&
  # A tokenizer for the whole 128k vocabulary: the demo one would decode >99% of the random model's ids to nothing.
  python3 -m tinkerbell.bench.vocab "$ckpt"; } >>"$log" 2>&1 || { tail -20 "$log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"
echo "checkpoint ready after $(( $(date +%s) - t0 )) s" | tee -a "$log"
if [ "$mode" = quick ]; then
  args=(--quick --gpu-memory-util 0.5)
else
  # 0.3 of the card for the KV cache leaves room for training (several users at once) and the in-process peer.
  args=(--scenarios sampling,concurrency,lora,training,scaling --gpu-memory-util 0.3)
fi
timeout -k 20 "$limit" python3 -m tinkerbell bench --model "$ckpt" --dtype bfloat16 --scaling-dp 1,2 \
  --out /tmp/bench-run --no-progress "${args[@]}" >>"$log" 2>&1
rc=$?
echo "bench exit status $rc after $(( $(date +%s) - t0 )) s" | tee -a "$log"
if [ "$rc" != 0 ]; then
  for f in /tmp/bench-run/*.log; do [ -f "$f" ] && { echo "== tail of $f"; tail -30 "$f"; } >>"$log"; done
fi
cp /tmp/bench-run/report.md /tmp/bench-run/results.json "$out/" 2>/dev/null
for f in /tmp/bench-run/*.png; do  # quick mode's sixth plot (mixed) would make a ninth file
  [ -f "$f" ] && [ "$(basename "$f")" != mixed_latency_cdf.png ] && cp "$f" "$out/"
done
grep -A12 "^## Summary" "$out/report.md" 2>/dev/null
tail -5 "$log"
ls -la "$out"
exit "$rc"
