#!/usr/bin/env bash
# Start a Tinkerbell server on NUM_GPUS GPUs, compatible with the original launch scripts.
#   scripts/run_server_multigpu.sh [MODEL] [NUM_GPUS] [GPU_MEMORY_UTIL] [extra `tinkerbell serve` flags...]
# Defaults: $VLLM_MODEL or HuggingFaceTB/SmolLM2-135M-Instruct, 1 GPU, $VLLM_GPU_MEMORY_UTIL or 0.4; 8 LoRA slots
# of rank <= 64 unless the environment (TINKERBELL_MAX_LORAS / MAX_LORAS / VLLM_MAX_LORAS, and the same for
# *_MAX_LORA_RANK) or an extra flag says otherwise.
# The GPUs are split into DP replicas (default 1) of TP = NUM_GPUS / DP GPUs each (tensor parallel, as the
# original scripts did); VLLM_TENSOR_PARALLEL_SIZE fixes TP instead, and DP then defaults to NUM_GPUS / TP.
# With DP > 1 the router listens on the port (--port, default 8000) and replicas on the ports above it; each
# replica gets its GPU group through CUDA_VISIBLE_DEVICES (taken from the caller's CUDA_VISIBLE_DEVICES if set).
# Everything else (port, data dir, keys) comes from extra flags or TINKERBELL_* variables.
set -euo pipefail

MODEL="${1:-${VLLM_MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}}"
NUM_GPUS="${2:-1}"
GPU_MEMORY_UTIL="${3:-${VLLM_GPU_MEMORY_UTIL:-0.4}}"
shift $(( $# < 3 ? $# : 3 ))

if [[ -n "${VLLM_TENSOR_PARALLEL_SIZE:-}" ]]; then
  TP="$VLLM_TENSOR_PARALLEL_SIZE"
  DP="${DP:-$(( NUM_GPUS / TP > 0 ? NUM_GPUS / TP : 1 ))}"
else
  DP="${DP:-1}"
  TP="$(( NUM_GPUS / DP > 0 ? NUM_GPUS / DP : 1 ))"
fi
if (( TP * DP != NUM_GPUS )); then
  echo "run_server_multigpu.sh: DP=$DP replicas x TP=$TP GPUs on NUM_GPUS=$NUM_GPUS: replicas share GPUs" >&2
fi

# Prefer the repo's virtual environment, then whatever `tinkerbell` is on PATH.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$ROOT/.venv/bin/tinkerbell" ]]; then
  TINKERBELL="$ROOT/.venv/bin/tinkerbell"
else
  TINKERBELL="tinkerbell"
fi

# Through the environment, not flags, so any alias the caller set still applies and extra flags still win.
export TINKERBELL_MAX_LORAS="${TINKERBELL_MAX_LORAS:-${MAX_LORAS:-${VLLM_MAX_LORAS:-8}}}"
export TINKERBELL_MAX_LORA_RANK="${TINKERBELL_MAX_LORA_RANK:-${MAX_LORA_RANK:-${VLLM_MAX_LORA_RANK:-64}}}"

DP_FLAGS=()
if (( DP > 1 )); then
  DP_FLAGS=(--dp "$DP")
fi
exec "$TINKERBELL" serve --model "$MODEL" --tp "$TP" ${DP_FLAGS[@]+"${DP_FLAGS[@]}"} --gpu-memory-util "$GPU_MEMORY_UTIL" "$@"
