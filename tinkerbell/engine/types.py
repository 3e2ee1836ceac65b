"""The engine's own job and result types: plain data, no HTTP, no wire formats.

The API layer converts `tinker.types` / protobuf into these; the engine never sees the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

LOSS_FUNCTIONS = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo")


class EngineUserError(ValueError):
    """The request itself is wrong (bad shapes, unknown run, ...): reported to the user as category 'user'."""


class EngineCapacityError(RuntimeError):
    """The engine ran out of a resource (GPU memory) while serving a request: not the request's fault, but its
    message is safe to show and says what to do; what the request touched is as it was before it."""


# ----------------------------------------------------------------------------------------------- training


@dataclass
class TrainDatum:
    """One training sequence. `tokens` are the model input (int64 [N]); `inputs` are the loss_fn_inputs as dense
    numpy arrays (`target_tokens` int64 [N] or [N, K]; `weights`, `advantages`, `logprobs`, ... float32)."""

    tokens: np.ndarray
    inputs: dict[str, np.ndarray]


@dataclass
class AdamParams:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 = no clipping


@dataclass
class ForwardBackwardResult:
    """Per-datum outputs in request order (each has `logprobs`, shaped like that datum's `target_tokens`,
    and `elementwise_loss`), plus metrics whose keys carry exactly one ':' (e.g. `loss:sum`)."""

    outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


# ----------------------------------------------------------------------------------------------- sampling


@dataclass
class SampleJob:
    prompt: list[int]
    num_samples: int = 1
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = no limit
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    stop_at_eos: bool = True  # False when the client sent stop=[] (run to max_tokens)
    adapter_key: str | None = None  # None = base model; else a key registered with the engine
    prompt_logprobs: bool = False
    prompt_logprobs_last_n: int | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    # Diffusion LMs only (engine/diffusion.py); None = the server's default. Autoregressive models ignore them.
    generation_algorithm: str | None = None  # basic (no_cache, simple) | prefix_cache | dual_cache
    steps: int | None = None  # denoising steps over the whole generation (default: max_tokens)
    block_length: int | None = None  # tokens per semi-autoregressive block
    remasking: str | None = None  # low_confidence | random
    threshold: float | None = None  # parallel decoding: commit every masked token above this confidence
    factor: float | None = None  # parallel decoding: Fast-dLLM's confidence-count rule
    cfg_scale: float = 0.0  # classifier-free guidance (0 = off)
    # Streaming: called on the engine thread as (sample_index, tokens of a block now final, finished).
    on_block: Callable[[int, list[int], bool], None] | None = None
    # Streaming (autoregressive sampler): called on the engine thread as (sample_index, token_id, logprob) for
    # every generated token, in order, once stop rules have run (a stop token is part of the output, so it is
    # reported too), before the request's future resolves. It must be quick and must not block; another
    # thread's consumer (an asyncio loop) is reached with loop.call_soon_threadsafe. An exception it raises
    # is logged and turns the callback off for that request; the request itself still completes.
    on_token: Callable[[int, int, float], None] | None = None


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]
    # [len(tokens), k] ids and logprobs when topk_sample_logprobs > 0
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float] | None = None  # len(prompt), NaN where not computed (index 0 always)
    topk_prompt_ids: np.ndarray | None = None  # [len(prompt), k]; row 0 empty
    topk_prompt_logprobs: np.ndarray | None = None
    prompt_cache_hit_tokens: int = 0
