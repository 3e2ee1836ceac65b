"""A diffusion request's generation parameters: resolved against the server's defaults and checked, field by
field, before the sampler holds anything of it (an EngineUserError names the first bad field)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tinkerbell.engine.diffusion_memory import DiffusionMemory
from tinkerbell.engine.diffusion_rules import REMASKING, canonical_algorithm
from tinkerbell.engine.types import EngineUserError, SampleJob

MAX_NUM_SAMPLES = 64


@dataclass(frozen=True)
class DiffusionParams:
    algorithm: str
    gen_length: int
    block_length: int
    steps_per_block: int
    temperature: float
    remasking: str
    threshold: float | None
    factor: float | None
    cfg_scale: float

    @property
    def num_blocks(self) -> int:
        return -(-self.gen_length // self.block_length)


def resolve_params(job: SampleJob, algorithm: str, default_block_length: int) -> DiffusionParams:
    """The request's generation parameters with the server's defaults (`algorithm`, `default_block_length`)
    filled in."""
    algorithm = canonical_algorithm(job.generation_algorithm or algorithm)
    gen = int(job.max_tokens)
    if gen < 1:
        raise EngineUserError(f"max_tokens: must be at least 1, got {gen}")
    block = job.block_length if job.block_length is not None else default_block_length
    if block < 1:
        raise EngineUserError(f"block_length: must be at least 1, got {block}")
    block = min(block, gen)  # a block longer than the generation is the whole generation
    steps = job.steps if job.steps is not None else gen
    if steps < 1:
        raise EngineUserError(f"steps: must be at least 1, got {steps}")
    num_blocks = -(-gen // block)
    remasking = job.remasking or "low_confidence"
    if remasking not in REMASKING:
        raise EngineUserError(f"remasking: must be one of {', '.join(REMASKING)}, got {remasking!r}")
    if not math.isfinite(job.temperature) or job.temperature < 0:
        raise EngineUserError(f"temperature: must be a finite number >= 0, got {job.temperature}")
    if job.threshold is not None and not (math.isfinite(job.threshold) and 0 < job.threshold <= 1):
        raise EngineUserError(f"threshold: must be in (0, 1], got {job.threshold}")
    if job.factor is not None and not (math.isfinite(job.factor) and job.factor > 0):
        raise EngineUserError(f"factor: must be a finite number > 0, got {job.factor}")
    if job.threshold is not None and job.factor is not None:
        raise EngineUserError("threshold, factor: two parallel-decoding rules; set at most one")
    if not math.isfinite(job.cfg_scale) or job.cfg_scale < 0:
        raise EngineUserError(f"cfg_scale: must be a finite number >= 0, got {job.cfg_scale}")
    return DiffusionParams(algorithm, gen, block, -(-steps // num_blocks), float(job.temperature), remasking,
                           job.threshold, job.factor, float(job.cfg_scale))


def validate_request(job: SampleJob, vocab_size: int, mask_id: int, max_context: int, memory: DiffusionMemory,
                     algorithm: str, default_block_length: int) -> DiffusionParams:
    """The whole request checked (prompt, sizes, memory, unsupported fields); its resolved parameters."""
    if not job.prompt:
        raise EngineUserError("prompt: must contain at least one token")
    lo, hi = min(job.prompt), max(job.prompt)
    if lo < 0 or hi >= vocab_size:
        raise EngineUserError(f"prompt: token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size})")
    if mask_id in job.prompt:
        raise EngineUserError(f"prompt: contains the mask token id {mask_id}")
    if not 1 <= job.num_samples <= MAX_NUM_SAMPLES:
        raise EngineUserError(f"num_samples: must be between 1 and {MAX_NUM_SAMPLES}, got {job.num_samples}")
    params = resolve_params(job, algorithm, default_block_length)
    total = len(job.prompt) + job.max_tokens
    if total > max_context:
        raise EngineUserError(f"max_tokens: prompt length {len(job.prompt)} + max_tokens {job.max_tokens} "
                              f"= {total} exceeds the model's context limit of {max_context} tokens")
    memory.check(total, params.algorithm, params.cfg_scale)
    if job.adapter_key is not None:
        raise EngineUserError("adapter_key: LoRA adapters are not supported for diffusion models (LLaDA)")
    unsupported = {"top_p": job.top_p != 1.0, "top_k": job.top_k not in (-1, 0),
                   "prompt_logprobs": job.prompt_logprobs or job.topk_prompt_logprobs > 0,
                   "topk_sample_logprobs": job.topk_sample_logprobs > 0}
    for name, bad in unsupported.items():
        if bad:
            raise EngineUserError(f"{name}: not supported by diffusion generation")
    if any(not s for s in job.stop_strings):
        raise EngineUserError("stop_strings: stop strings must not be empty")
    return params
