#!/usr/bin/env bash
# N replicas (one per GPU) behind Tinkerbell's router, with the existing multi-GPU LLaDA server's flags:
#   scripts/start_multi_gpu_server.sh [--gpu-ids 0,2,4,6] [--num-gpus N] [--port P] [--worker-base-port P]
#       [--dry-run] [any `tinkerbell serve` flag: --model, --algorithm, --batch-size, ...]
# The router listens on --port (default 8000); replicas take the ports after it (PORT+1..PORT+N), so
# --worker-base-port must be PORT+1 if given. --gpu-ids sets CUDA_VISIBLE_DEVICES; --num-gpus defaults to their count.
set -euo pipefail

GPU_IDS="" NUM="" PORT=8000 WORKER_BASE="" DRY=0 REST=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpu-ids) GPU_IDS="$2"; shift ;;
    --num-gpus) NUM="$2"; shift ;;
    --port) PORT="$2"; shift ;;
    --worker-base-port) WORKER_BASE="$2"; shift ;;
    --dry-run) DRY=1 ;;
    *) REST+=("$1") ;;
  esac
  shift
done
if [[ -n "$GPU_IDS" && -z "$NUM" ]]; then
  IFS=, read -ra IDS <<< "$GPU_IDS"; NUM="${#IDS[@]}"
fi
NUM="${NUM:-1}"
if [[ -n "$WORKER_BASE" && "$WORKER_BASE" -ne $((PORT + 1)) ]]; then
  echo "start_multi_gpu_server.sh: replicas listen on PORT+1..PORT+N; use --port $((WORKER_BASE - 1))" >&2; exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TINKERBELL="tinkerbell"
[[ -x "$ROOT/.venv/bin/tinkerbell" ]] && TINKERBELL="$ROOT/.venv/bin/tinkerbell"
CMD=("$TINKERBELL" serve --port "$PORT" --dp "$NUM" "${REST[@]}")
if [[ "$DRY" -eq 1 ]]; then
  [[ -n "$GPU_IDS" ]] && printf 'CUDA_VISIBLE_DEVICES=%s ' "$GPU_IDS"
  printf '%q ' "${CMD[@]}"; echo; exit 0
fi
[[ -n "$GPU_IDS" ]] && export CUDA_VISIBLE_DEVICES="$GPU_IDS"
exec "${CMD[@]}"
