"""The Tinker loss functions (tinker_api.md 4.6) against per-element formulas written out by hand, their
gradients against the derivative of those formulas, and the validation of their inputs."""

import math

import numpy as np
import pytest
import torch

from tinkerbell.engine.losses import LOSSES, LossConfig, datum_inputs, resolve, validate
from tinkerbell.engine.types import EngineUserError, TrainDatum

# Chosen so that, with bounds 0.8/1.2, PPO takes the clipped branch at positions 1 and 2 and not at 0 and 3.
LP = [-1.0, -0.5, -2.0, -0.1]
Q = [-1.0, -1.0, -1.5, -0.5]
ADV = [1.0, 1.0, -1.0, -2.0]


def _run(name: str, lp: list, inputs: dict[str, list], config: dict | None = None):
    """(elementwise loss, d(sum loss)/d lp) from our implementation."""
    x = torch.tensor(lp, dtype=torch.float32, requires_grad=True)
    tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in inputs.items()}
    out = LOSSES[name].compute(x, tensors, LossConfig.parse(config))
    out.sum().backward()
    return out.detach(), x.grad


def _clip(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def _close(got: torch.Tensor, want: list) -> None:
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float32), atol=1e-6), (got, want)


def test_cross_entropy_soft_targets_and_negative_weights():
    lp = [[-0.2, -1.7], [-3.0, -0.05], [-0.9, -0.6]]
    w = [[0.7, 0.3], [-1.5, 0.0], [2.0, -0.25]]
    loss, grad = _run("cross_entropy", lp, {"weights": w})
    _close(loss, [[-w[t][k] * lp[t][k] for k in range(2)] for t in range(3)])
    _close(grad, [[-w[t][k] for k in range(2)] for t in range(3)])


def test_importance_sampling():
    loss, grad = _run("importance_sampling", LP, {"logprobs": Q, "advantages": ADV})
    r = [math.exp(a - b) for a, b in zip(LP, Q)]
    _close(loss, [-ri * a for ri, a in zip(r, ADV)])
    _close(grad, [-ri * a for ri, a in zip(r, ADV)])


def test_ppo_clips_with_default_ratio_bounds():
    loss, grad = _run("ppo", LP, {"logprobs": Q, "advantages": ADV})
    want, want_grad = [], []
    for lp, q, a in zip(LP, Q, ADV):
        r = math.exp(lp - q)
        unclipped, clipped = r * a, _clip(r, 0.8, 1.2) * a
        want.append(-min(unclipped, clipped))
        # The clipped branch is flat in lp once r is outside the bounds.
        want_grad.append(-r * a if unclipped <= clipped else 0.0)
    _close(loss, want)
    _close(grad, want_grad)
    assert want_grad[1] == 0.0 and want_grad[2] == 0.0 and want_grad[3] != 0.0  # clipping really active


def test_ppo_per_position_thresholds_override_config():
    lo, hi = [0.5, 0.5, 0.5, 0.5], [2.0, 2.0, 2.0, 1.1]
    loss, _ = _run("ppo", LP, {"logprobs": Q, "advantages": ADV, "clip_low_threshold": lo, "clip_high_threshold": hi},
                   {"clip_low_threshold": 0.99, "clip_high_threshold": 1.01})
    want = []
    for i, (lp, q, a) in enumerate(zip(LP, Q, ADV)):
        r = math.exp(lp - q)
        want.append(-min(r * a, _clip(r, lo[i], hi[i]) * a))
    _close(loss, want)


def test_ppo_config_bounds():
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    loss, _ = _run("ppo", LP, {"logprobs": Q, "advantages": ADV}, config)
    _close(loss, [-min(math.exp(lp - q) * a, _clip(math.exp(lp - q), 0.9, 1.1) * a) for lp, q, a in zip(LP, Q, ADV)])


def test_cispo_stops_gradient_through_clipped_ratio():
    loss, grad = _run("cispo", LP, {"logprobs": Q, "advantages": ADV})
    weights = [_clip(math.exp(lp - q), 0.8, 1.2) for lp, q in zip(LP, Q)]
    _close(loss, [-w * lp * a for w, lp, a in zip(weights, LP, ADV)])
    _close(grad, [-w * a for w, a in zip(weights, ADV)])


def test_dro_reads_beta():
    beta = 0.3
    loss, grad = _run("dro", LP, {"logprobs": Q, "advantages": ADV}, {"beta": beta})
    _close(loss, [-(lp * a - 0.5 * beta * (lp - q) ** 2) for lp, q, a in zip(LP, Q, ADV)])
    _close(grad, [-(a - beta * (lp - q)) for lp, q, a in zip(LP, Q, ADV)])
    default, _ = _run("dro", LP, {"logprobs": Q, "advantages": ADV})
    _close(default, [-(lp * a - 0.5 * 0.05 * (lp - q) ** 2) for lp, q, a in zip(LP, Q, ADV)])


def test_gspo_uses_the_masked_sequence_ratio():
    mask = [0.0, 1.0, 1.0, 1.0]
    adv = [0.0, 1.0, 1.0, 1.0]
    lp = [-0.3, -0.5, -1.0, -0.2]
    q = [-2.0, -0.6, -1.1, -0.3]  # ratio over the masked positions: exp(0.1) ≈ 1.105, inside the bounds
    loss, grad = _run("gspo", lp, {"logprobs": q, "advantages": adv, "sequence_ratio_mask": mask})
    s = math.exp(sum(lp[t] - q[t] for t in (1, 2, 3)) / 3)  # position 0 (ratio e^1.7) is masked out
    _close(loss, [-s * a for a in adv])
    _close(grad, [-s * a for a in adv])
    # With a large sequence ratio the clipped branch wins for positive advantages: no gradient.
    loss, grad = _run("gspo", lp, {"logprobs": [v - 1.0 for v in lp], "advantages": adv, "sequence_ratio_mask": mask})
    _close(loss, [-min(math.e * a, 1.2 * a) for a in adv])
    _close(grad, [0.0, 0.0, 0.0, 0.0])


def test_stable_reinforce_and_unknown_losses_are_refused():
    with pytest.raises(EngineUserError, match="stable_reinforce.*AsyncConfig.loss_fn"):
        resolve("stable_reinforce")
    with pytest.raises(EngineUserError, match="cross_entropy, importance_sampling, ppo, cispo, dro, gspo"):
        resolve("hinge")


def _datum(n=4, **inputs) -> TrainDatum:
    """A datum valid for every loss, with `inputs` replaced (None: removed)."""
    base = {"target_tokens": np.arange(n, dtype=np.int64)}
    base.update({k: np.ones(n, dtype=np.float32) for k in ("weights", "logprobs", "advantages", "sequence_ratio_mask")})
    base.update(inputs)
    return TrainDatum(tokens=np.arange(n, dtype=np.int64), inputs={k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize(
    "loss_fn, datum, message",
    [
        ("cross_entropy", _datum(weights=None),
         r"data\[1\]\.loss_fn_inputs\.weights is required for cross_entropy"),
        ("ppo", _datum(logprobs=None), r"data\[1\]\.loss_fn_inputs\.logprobs is required for ppo"),
        ("gspo", _datum(sequence_ratio_mask=None), r"sequence_ratio_mask is required for gspo"),
        ("cross_entropy", _datum(weights=np.ones(3, np.float32)),
         r"data\[1\]\.loss_fn_inputs\.weights has shape \[3\]; want \[4\]"),
        ("cross_entropy", _datum(target_tokens=np.zeros(5, np.int64)), r"target_tokens has shape \[5\]; want \[4\]"),
        ("cross_entropy", _datum(target_tokens=np.array([1, 2, 99, 3])), r"target_tokens holds token id 99, outside"),
        ("cross_entropy", _datum(weights=np.array([1, np.nan, 1, 1], np.float32)), r"weights must hold finite numbers"),
        ("cross_entropy", TrainDatum(np.array([1, -1, 2, 3]), _datum().inputs),
         r"data\[1\]\.model_input holds token id -1"),
        ("cross_entropy", TrainDatum(np.zeros(0, np.int64), _datum(0).inputs),
         r"data\[1\]\.model_input must hold at least one"),
        ("ppo", _datum(clip_low_threshold=np.zeros(2, np.float32)), r"clip_low_threshold has shape \[2\]"),
    ],
)
def test_validation_names_the_field(loss_fn, datum, message):
    with pytest.raises(EngineUserError, match=message):
        validate([_datum(), datum], resolve(loss_fn), vocab_size=10, max_len=100)


def test_validation_accepts_soft_targets_and_ignores_unknown_keys():
    targets = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int64)
    d = TrainDatum(np.arange(3), {"target_tokens": targets, "weights": np.ones((3, 2), np.float32),
                                  "mask": np.ones(7, np.float32)})
    validate([d], resolve("cross_entropy"), vocab_size=10, max_len=100)
    assert set(datum_inputs(d, resolve("cross_entropy"), torch.device("cpu"))) == {"weights"}


def test_bad_config_value_is_refused():
    with pytest.raises(EngineUserError, match="loss_fn_config.beta must be finite"):
        LossConfig.parse({"beta": float("inf")})
