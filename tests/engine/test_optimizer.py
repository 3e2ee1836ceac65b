"""Our per-adapter AdamW is torch.optim.AdamW (+ clip_grad_norm_), with hyper-parameters that change per step."""

import pytest
import torch

from tinkerbell.engine.optimizer import AdamW
from tinkerbell.engine.types import AdamParams, EngineUserError

SHAPES = {"a": (4, 6), "b": (6, 4), "c": (3,)}


def _params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g).requires_grad_(True) for k, s in SHAPES.items()}


def _packed(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The same parameters as leaf views of one buffer (as training_params.pack lays out a run's masters)."""
    flat = torch.cat([t.detach().reshape(-1) for t in _params(seed).values()])
    views, at = {}, 0
    for k, s in SHAPES.items():
        n = torch.Size(s).numel()
        views[k] = flat[at:at + n].view(s).requires_grad_(True)
        at += n
    return views, flat


def _grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(*s, generator=g) * (1 + step) for k, s in SHAPES.items()}


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
@pytest.mark.parametrize("clip", [0.0, 1.5])
def test_matches_torch_adamw_with_weight_decay_and_clipping(clip, packed):
    """Separate parameters, or views of one buffer (stepped as that buffer: a few ops instead of a few per
    tensor)."""
    ref = _params(0)
    ours, flat = _packed(0) if packed else (_params(0), None)
    opt = AdamW.for_params(ours, flat)
    torch_opt = torch.optim.AdamW(list(ref.values()), foreach=False)
    for step in range(6):
        hp = AdamParams(learning_rate=1e-2 * (1 + step % 3), beta1=0.9, beta2=0.95 - 0.01 * step, eps=1e-8,
                        weight_decay=0.1, grad_clip_norm=clip)
        grads = _grads(step)
        for k in SHAPES:
            ours[k].grad = grads[k].clone()
            ref[k].grad = grads[k].clone()
        metrics = opt.step(hp)
        norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), clip if clip > 0 else float("inf"))
        for group in torch_opt.param_groups:
            group.update(lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay)
        torch_opt.step()
        torch_opt.zero_grad()
        assert metrics["grad_norm"] == pytest.approx(norm.item(), rel=1e-6)
        assert metrics["learning_rate"] == hp.learning_rate
        for k in SHAPES:
            assert ours[k].grad is None
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-6, atol=1e-7)


def test_step_without_gradients_changes_nothing():
    params = _params(1)
    before = {k: v.detach().clone() for k, v in params.items()}
    opt = AdamW.for_params(params)
    assert opt.step(AdamParams(learning_rate=0.1, weight_decay=0.5))["grad_norm"] == 0.0
    assert opt.step_count == 0
    for k in SHAPES:
        assert torch.equal(params[k], before[k])


def test_state_round_trip_into_a_packed_optimizer(tmp_path):
    """Saved from separate tensors, loaded into one whose moments are views of one buffer: the load writes
    into those views (the packed step reads the buffers), and the next steps agree exactly."""
    a = _params(2)
    b, flat = _packed(2)
    opt = AdamW.for_params(a)
    hp = AdamParams(learning_rate=1e-2, weight_decay=0.01)
    for step in range(2):
        for k, g in _grads(step).items():
            a[k].grad = g
        opt.step(hp)
    opt.save(tmp_path)
    with torch.no_grad():
        for k in SHAPES:
            b[k].copy_(a[k])
    restored = AdamW.for_params(b, flat)
    restored.load(tmp_path)
    assert restored.step_count == 2
    assert restored.flat is not None
    for k in SHAPES:
        assert torch.equal(restored.exp_avg[k], opt.exp_avg[k])
        assert restored.exp_avg[k].untyped_storage().data_ptr() == restored.flat[1].untyped_storage().data_ptr()
    for k, g in _grads(5).items():
        a[k].grad, b[k].grad = g.clone(), g.clone()
    opt.step(hp)
    restored.step(hp)
    for k in SHAPES:
        assert torch.equal(a[k], b[k])


def test_missing_state_and_bad_params_are_user_errors(tmp_path):
    opt = AdamW.for_params(_params(3))
    with pytest.raises(EngineUserError, match="no optimizer state"):
        opt.load(tmp_path)
    with pytest.raises(EngineUserError, match="adam_params.beta2 must be in"):
        opt.step(AdamParams(beta2=1.0))
    with pytest.raises(EngineUserError, match="adam_params.learning_rate must be a finite number"):
        opt.step(AdamParams(learning_rate=float("nan")))


def test_non_finite_gradient_is_refused_and_dropped():
    params = _params(4)
    before = {k: v.detach().clone() for k, v in params.items()}
    opt = AdamW.for_params(params)
    for k, g in _grads(0).items():
        params[k].grad = g
    params["a"].grad[0, 0] = float("inf")
    with pytest.raises(EngineUserError, match="not finite"):
        opt.step(AdamParams())
    assert opt.step_count == 0 and all(p.grad is None for p in params.values())
    assert all(torch.equal(params[k], before[k]) for k in SHAPES)
