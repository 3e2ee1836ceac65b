"""Tinker's loss functions (tinker_api.md 4.6), computed from per-token log-probabilities, and the validation
of their inputs.

Every loss here maps `lp` (the model's log-probability of each target, shaped like `target_tokens`: [N] or
[N, K]) and the datum's float inputs to an elementwise loss of the same shape. The trainer calls each loss once
per request on the flattened targets of all its datums, with `group` (the datum of each target) for the one
loss that reduces over a datum (gspo). The request's loss is the plain
sum of those (no means), so its gradient is the sum of the per-token gradients, as the protocol specifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from tinkerbell.engine.types import LOSS_FUNCTIONS, EngineUserError, TrainDatum

Inputs = dict[str, torch.Tensor]

# Per-position overrides of the config's ratio bounds (tinker_api.md 8.13): read when present, never required.
CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")


@dataclass(frozen=True)
class LossConfig:
    """`loss_fn_config`, resolved. The clip thresholds are ratio bounds (lo = 1 - eps_low), not epsilons."""

    clip_low: float = 0.8
    clip_high: float = 1.2
    beta: float = 0.05  # dro: the docs' example value; the protocol documents no default

    @classmethod
    def parse(cls, config: dict[str, float] | None) -> "LossConfig":
        values: dict[str, float] = {}
        for key, attr in (("clip_low_threshold", "clip_low"), ("clip_high_threshold", "clip_high"), ("beta", "beta")):
            if config is None or key not in config:
                continue
            raw = config[key]
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise EngineUserError(f"loss_fn_config.{key} must be a number, got {raw!r}") from None
            if not math.isfinite(value):
                raise EngineUserError(f"loss_fn_config.{key} must be finite, got {value}")
            values[attr] = value
        return cls(**values)


@dataclass(frozen=True)
class LossFn:
    name: str
    required: tuple[str, ...]  # float inputs besides target_tokens
    optional: tuple[str, ...]  # float inputs read when present
    # (lp, inputs, config, group) -> elementwise loss; group: datum index of each element (None: one datum)
    compute: Callable[..., torch.Tensor]

    def float_inputs(self) -> tuple[str, ...]:
        return self.required + self.optional


def _ratio_bounds(lp: torch.Tensor, inputs: Inputs, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    lo = inputs.get("clip_low_threshold")
    hi = inputs.get("clip_high_threshold")
    return (
        lo if lo is not None else torch.full_like(lp, cfg.clip_low),
        hi if hi is not None else torch.full_like(lp, cfg.clip_high),
    )


def _clip(r: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.minimum(torch.maximum(r, lo), hi)


def _cross_entropy(lp: torch.Tensor, x: Inputs, cfg: LossConfig, group: torch.Tensor | None = None) -> torch.Tensor:
    return -x["weights"] * lp


def _importance_sampling(lp: torch.Tensor, x: Inputs, cfg: LossConfig, group: torch.Tensor | None = None) -> torch.Tensor:
    return -torch.exp(lp - x["logprobs"]) * x["advantages"]


def _ppo(lp: torch.Tensor, x: Inputs, cfg: LossConfig, group: torch.Tensor | None = None) -> torch.Tensor:
    r, a = torch.exp(lp - x["logprobs"]), x["advantages"]
    lo, hi = _ratio_bounds(lp, x, cfg)
    return -torch.minimum(r * a, _clip(r, lo, hi) * a)


def _cispo(lp: torch.Tensor, x: Inputs, cfg: LossConfig, group: torch.Tensor | None = None) -> torch.Tensor:
    lo, hi = _ratio_bounds(lp, x, cfg)
    weight = _clip(torch.exp(lp - x["logprobs"]), lo, hi).detach()
    return -weight * lp * x["advantages"]


def _dro(lp: torch.Tensor, x: Inputs, cfg: LossConfig, group: torch.Tensor | None = None) -> torch.Tensor:
    q = x["logprobs"]
    return -(lp * x["advantages"] - 0.5 * cfg.beta * (lp - q) ** 2)


def _gspo(lp: torch.Tensor, x: Inputs, cfg: LossConfig, group: torch.Tensor | None = None) -> torch.Tensor:
    mask = (x["sequence_ratio_mask"] != 0).to(lp.dtype)
    # Mean over each datum's masked positions; a datum with an empty mask has log sequence ratio 0 (ratio 1).
    masked = (lp.detach() - x["logprobs"]) * mask
    if group is None:
        log_ratio = masked.sum() / mask.sum().clamp(min=1.0)
    else:
        # Sized by the element count (≥ the number of datums) rather than group.max() + 1, which would stop the
        # host until the GPU caught up, mid-step.
        n = group.numel()
        num = torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add_(0, group, masked.reshape(-1))
        den = torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add_(0, group, mask.reshape(-1))
        log_ratio = (num / den.clamp(min=1.0))[group].view_as(lp)
    # Value: the sequence ratio; gradient: that of the token's own log-probability.
    s = torch.exp(log_ratio + lp - lp.detach())
    lo, hi = _ratio_bounds(lp, x, cfg)
    a = x["advantages"]
    return -torch.minimum(s * a, _clip(s, lo, hi) * a)


_RL = ("logprobs", "advantages")
LOSSES: dict[str, LossFn] = {
    f.name: f
    for f in (
        LossFn("cross_entropy", ("weights",), (), _cross_entropy),
        LossFn("importance_sampling", _RL, (), _importance_sampling),
        LossFn("ppo", _RL, CLIP_INPUTS, _ppo),
        LossFn("cispo", _RL, CLIP_INPUTS, _cispo),
        LossFn("dro", _RL, (), _dro),
        LossFn("gspo", _RL + ("sequence_ratio_mask",), CLIP_INPUTS, _gspo),
    )
}
assert tuple(LOSSES) == LOSS_FUNCTIONS


def resolve(loss_fn: str) -> LossFn:
    if loss_fn == "stable_reinforce":
        raise EngineUserError(
            "loss_fn 'stable_reinforce' is not supported by this server; use loss_fn='ppo' or "
            "'importance_sampling' (for cookbook async RL set AsyncConfig.loss_fn)"
        )
    loss = LOSSES.get(loss_fn)
    if loss is None:
        raise EngineUserError(f"unknown loss_fn {loss_fn!r}; supported: {', '.join(LOSS_FUNCTIONS)}")
    return loss


def validate(data: list[TrainDatum], loss: LossFn, vocab_size: int, max_len: int) -> None:
    """Refuse a request the model cannot score, naming the offending field; nothing runs before this passes."""
    if not data:
        raise EngineUserError("data is empty: forward_backward needs at least one datum")
    for i, d in enumerate(data):
        where = f"data[{i}]"
        tokens = np.asarray(d.tokens)
        if tokens.ndim != 1 or tokens.shape[0] < 1:
            raise EngineUserError(f"{where}.model_input must hold at least one token, got shape {list(tokens.shape)}")
        n = tokens.shape[0]
        if n > max_len:
            raise EngineUserError(f"{where}.model_input has {n} tokens; the model allows at most {max_len}")
        _check_ids(tokens, f"{where}.model_input", vocab_size)
        target = d.inputs.get("target_tokens")
        if target is None:
            raise EngineUserError(f"{where}.loss_fn_inputs.target_tokens is required for {loss.name}")
        target = np.asarray(target)
        if target.ndim not in (1, 2) or target.shape[0] != n or (target.ndim == 2 and target.shape[1] < 1):
            raise EngineUserError(
                f"{where}.loss_fn_inputs.target_tokens has shape {list(target.shape)}; want [{n}] or [{n}, K] "
                f"(one row per model_input token)"
            )
        _check_ids(target, f"{where}.loss_fn_inputs.target_tokens", vocab_size)
        for key in loss.float_inputs():
            value = d.inputs.get(key)
            field = f"{where}.loss_fn_inputs.{key}"
            if value is None:
                if key in loss.required:
                    raise EngineUserError(f"{field} is required for {loss.name}")
                continue
            value = np.asarray(value)
            if value.shape != target.shape:
                raise EngineUserError(
                    f"{field} has shape {list(value.shape)}; want {list(target.shape)} (the shape of target_tokens)"
                )
            if not np.issubdtype(value.dtype, np.number) or not np.all(np.isfinite(value)):
                raise EngineUserError(f"{field} must hold finite numbers")


def _check_ids(ids: np.ndarray, field: str, vocab_size: int) -> None:
    if not np.issubdtype(ids.dtype, np.integer):
        raise EngineUserError(f"{field} must hold integer token ids, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise EngineUserError(f"{field} holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def flat_inputs(data: list[TrainDatum], loss: LossFn, config: LossConfig, device: torch.device) -> Inputs:
    """The float inputs `loss` reads for all of `data`, each flattened row-major and concatenated (so they line
    up with the flattened targets), as one float32 tensor per input: one host-to-device copy per input, not per
    datum. An optional input that some datums lack is filled with the config's value, which is what the loss
    uses when it is absent."""
    defaults = {"clip_low_threshold": config.clip_low, "clip_high_threshold": config.clip_high}
    out: Inputs = {}
    for key in loss.float_inputs():
        present = [key in d.inputs for d in data]
        if not any(present):
            continue
        parts = []
        for d, has in zip(data, present):
            if has:
                parts.append(np.asarray(d.inputs[key], dtype=np.float32).reshape(-1))
            else:
                parts.append(np.full(np.asarray(d.inputs["target_tokens"]).size, defaults[key], np.float32))
        out[key] = torch.from_numpy(np.concatenate(parts)).to(device, non_blocking=True)
    return out


def datum_inputs(datum: TrainDatum, loss: LossFn, device: torch.device) -> Inputs:
    """The float inputs `loss` reads, as float32 tensors (validated beforehand)."""
    return {
        key: torch.as_tensor(np.asarray(datum.inputs[key]), dtype=torch.float32, device=device)
        for key in loss.float_inputs()
        if key in datum.inputs
    }
