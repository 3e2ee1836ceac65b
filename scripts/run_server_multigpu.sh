#!/usr/bin/env bash
# Start a Tinkerbell server on NUM_GPUS GPUs (tensor parallel), compatible with the original launch scripts.
#   scripts/run_server_multigpu.sh [MODEL] [NUM_GPUS] [GPU_MEMORY_UTIL] [extra `tinkerbell serve` flags...]
# Defaults: HuggingFaceTB/SmolLM2-135M-Instruct, 1 GPU, 0.4; 8 LoRA slots of rank <= 64 unless the environment
# (TINKERBELL_MAX_LORAS / MAX_LORAS / VLLM_MAX_LORAS, and the same for *_MAX_LORA_RANK) or an extra flag says
# otherwise. Everything else (port, data dir, keys) comes from extra flags or TINKERBELL_* variables.
set -euo pipefail

MODEL="${1:-HuggingFaceTB/SmolLM2-135M-Instruct}"
NUM_GPUS="${2:-1}"
GPU_MEMORY_UTIL="${3:-0.4}"
shift $(( $# < 3 ? $# : 3 ))

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

exec "$TINKERBELL" serve --model "$MODEL" --tp "$NUM_GPUS" --gpu-memory-util "$GPU_MEMORY_UTIL" "$@"
