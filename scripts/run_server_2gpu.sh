#!/usr/bin/env bash
# 2 GPUs: scripts/run_server_2gpu.sh [MODEL] [GPU_MEMORY_UTIL] [extra serve flags...]
# Tensor parallel over all 2 by default; DP=<replicas> (or VLLM_TENSOR_PARALLEL_SIZE) splits them into replicas
# behind the router (see run_server_multigpu.sh).
set -euo pipefail
MODEL="${1:-${VLLM_MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}}"
GPU_MEMORY_UTIL="${2:-${VLLM_GPU_MEMORY_UTIL:-0.4}}"
shift $(( $# < 2 ? $# : 2 ))
exec "$(dirname "${BASH_SOURCE[0]}")/run_server_multigpu.sh" "$MODEL" 2 "$GPU_MEMORY_UTIL" "$@"
