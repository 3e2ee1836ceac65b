#!/usr/bin/env bash
# Serve a LLaDA (masked-diffusion) model with batched generation, locally or as a SLURM job. A thin wrapper
# over `tinkerbell serve`, taking the existing LLaDA batch server's flags:
#   scripts/start_llada_batch_server.sh [--local] [--gpus N] [--model-path M | --dcp-path D --base-model M]
#       [--algorithm A] [--batch-size B] [--max-wait-time S] [--port P] [--no-chat-template]
#       [--time HH:MM:SS] [--partition P] [--job-name J] [--dry-run] [-- extra `tinkerbell serve` flags]
# Without --local the same command is submitted with sbatch (needs $ACCOUNT); --dry-run prints the job script
# (or, with --local, the command) instead of running it. --gpus N > 1 runs N replicas behind the router (--dp N).
set -euo pipefail

LOCAL=0 DRY=0 GPUS=1 MODEL="" DCP="" BASE="" ALGO="" BATCH="" WAIT="" PORT=8000
TIME="04:00:00" PARTITION="" JOB_NAME="llada-server" EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --local) LOCAL=1 ;;
    --dry-run) DRY=1 ;;
    --gpus) GPUS="$2"; shift ;;
    --model-path) MODEL="$2"; shift ;;
    --dcp-path) DCP="$2"; shift ;;
    --base-model) BASE="$2"; shift ;;
    --algorithm) ALGO="$2"; shift ;;
    --batch-size) BATCH="$2"; shift ;;
    --max-wait-time) WAIT="$2"; shift ;;
    --port) PORT="$2"; shift ;;
    --time) TIME="$2"; shift ;;
    --partition) PARTITION="$2"; shift ;;
    --job-name) JOB_NAME="$2"; shift ;;
    --no-chat-template)
      # Tinkerbell never templates /v1/completions prompts; /v1/chat/completions always uses the model's template.
      echo "note: --no-chat-template: send raw prompts to /v1/completions (never templated)" >&2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "start_llada_batch_server.sh: unknown flag $1" >&2; exit 2 ;;
  esac
  shift
done

if [[ -n "$DCP" && -z "$BASE" ]]; then
  echo "start_llada_batch_server.sh: --dcp-path needs --base-model" >&2; exit 2
fi
if [[ -z "$MODEL" && -z "$BASE" ]]; then
  MODEL="GSAI-ML/LLaDA-8B-Instruct"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TINKERBELL="tinkerbell"
[[ -x "$ROOT/.venv/bin/tinkerbell" ]] && TINKERBELL="$ROOT/.venv/bin/tinkerbell"

CMD=("$TINKERBELL" serve --port "$PORT")
[[ -n "$MODEL" ]] && CMD+=(--model "$MODEL")
[[ -n "$DCP" ]] && CMD+=(--dcp-path "$DCP" --base-model "$BASE")
[[ -n "$ALGO" ]] && CMD+=(--algorithm "$ALGO")
[[ -n "$BATCH" ]] && CMD+=(--batch-size "$BATCH")
[[ -n "$WAIT" ]] && CMD+=(--max-wait-time "$WAIT")
[[ "$GPUS" -gt 1 ]] && CMD+=(--dp "$GPUS")
CMD+=("${EXTRA[@]}")

if [[ "$LOCAL" -eq 1 ]]; then
  if [[ "$DRY" -eq 1 ]]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
  exec "${CMD[@]}"
fi

if [[ -z "${ACCOUNT:-}" && "$DRY" -eq 0 ]]; then
  echo "start_llada_batch_server.sh: set ACCOUNT to your SLURM account (or pass --local)" >&2; exit 2
fi
SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --account=${ACCOUNT:-\$ACCOUNT}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:$GPUS
#SBATCH --cpus-per-task=$((8 * GPUS))
#SBATCH --time=$TIME
#SBATCH --output=$JOB_NAME-%j.log"
[[ -n "$PARTITION" ]] && SCRIPT+=$'\n'"#SBATCH --partition=$PARTITION"
SCRIPT+=$'\n'"set -euo pipefail"$'\n'"cd $(printf '%q' "$ROOT")"$'\n'"echo \"serving on \$(hostname):$PORT\""
SCRIPT+=$'\n'"exec $(printf '%q ' "${CMD[@]}")"

if [[ "$DRY" -eq 1 ]]; then echo "$SCRIPT"; exit 0; fi
echo "$SCRIPT" | sbatch
