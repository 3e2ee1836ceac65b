#!/usr/bin/env bash
# Two GPUs, tensor parallel: scripts/run_server_2gpu.sh [MODEL] [GPU_MEMORY_UTIL] [extra serve flags...]
set -euo pipefail
MODEL="${1:-HuggingFaceTB/SmolLM2-135M-Instruct}"
GPU_MEMORY_UTIL="${2:-0.4}"
shift $(( $# < 2 ? $# : 2 ))
exec "$(dirname "${BASH_SOURCE[0]}")/run_server_multigpu.sh" "$MODEL" 2 "$GPU_MEMORY_UTIL" "$@"
