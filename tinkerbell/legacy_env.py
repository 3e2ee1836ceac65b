"""The original launch scripts' environment variables, accepted so those scripts start this server unchanged.

`PORT` is honoured as an alias of `--port` (config.ENV_ALIASES). The others chose between the prototype's
backends (Megatron, vLLM, Hugging Face); this server has one built-in engine that trains and samples on one
copy of the base weights, so they have nothing to select: `notice` says, in one log line, what the engine
does in their place.
"""

from __future__ import annotations

from collections.abc import Mapping

# variable -> what the built-in engine does instead
REPLACED: dict[str, str] = {
    "TRAINING_BACKEND": "training runs in the built-in engine (packed multi-LoRA forward/backward)",
    "USE_MEGATRON": "no Megatron: the built-in engine trains; use --tp for tensor parallelism",
    "USE_MEGATRON_BRIDGE": "no Megatron-Bridge: trained LoRA weights reach the sampler by an in-memory copy",
    "USE_VLLM": "no vLLM: the built-in sampler (paged KV cache, continuous batching, multi-LoRA) serves "
                "sampling and the OpenAI API",
    "VLLM_ENABLE_LORA": "LoRA is always on (--max-loras slots of rank up to --max-lora-rank)",
    "VLLM_DTYPE": "the dtype is --dtype / TINKERBELL_DTYPE (auto: bfloat16 on GPU, float32 on CPU)",
    "VLLM_TRUST_REMOTE_CODE": "no remote code is ever run: the engine has its own Llama/Qwen modules",
    "VLLM_MAX_MODEL_LEN": "the context is the model's own (its max_position_embeddings, at most 8192)",
}


def notice(environ: Mapping[str, str]) -> str | None:
    """One log line for the replaced variables that are set, or None when none is."""
    found = [(k, environ[k]) for k in REPLACED if environ.get(k) not in (None, "")]
    if not found:
        return None
    return ("original launch-script settings accepted, nothing to select: "
            + "; ".join(f"{k}={v}: {REPLACED[k]}" for k, v in found))
