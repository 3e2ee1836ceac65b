"""Training on the sharded model (gloo, 2 ranks on the CPU) equals training unsharded: target logprobs,
losses, every LoRA gradient, the AdamW steps (replicated tensors stay identical on every rank), and a
checkpoint saved at TP 2 is the whole adapter and optimizer state, which loads at TP 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinkerbell.engine.models.loader import load_model, read_config
from tinkerbell.engine.tp.shard import lora_name_piece, plan_shard
from tinkerbell.engine.training import Trainer

REL = 1e-5
# Later steps start from parameters that already differ by float32 rounding between TP 1 and TP 2 (different
# summation orders): their gradients are compared at a few times the first step's tolerance.
LATER_REL = 5e-5
# Adam divides each gradient entry by its own magnitude, so an entry near zero turns rounding into a visible
# difference of its update: parameters after the steps agree to a small fraction of one step (lr = 1e-2 in
# ranks.train_steps), where a wrong step would be off by about a whole one.
PARAM_ABS = 2e-3 * 1e-2
NAMES = ["llama_kv2", "qwen3_kv1_odd_vocab", "llama_biases"]


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = REL) -> bool:
    return got.shape == want.shape and (got - want).abs().max().item() <= rel * max(want.abs().max().item(), 1e-3)


@pytest.fixture(params=NAMES)
def trained(request, tp_run):
    """(TP 1 reference, TP 2 rank outputs, TP 2 checkpoint dir, model path) for one model."""
    run = tp_run(request.param)
    return run.ref["train"], [r["train"] for r in run.ranks], run.saved, run.path


def test_target_logprobs_and_losses_equal_tp1(trained):
    ref, outs, _, _ = trained
    for step in range(len(ref["loss"])):
        assert outs[0]["loss"][step] == pytest.approx(ref["loss"][step], rel=REL)
        for got, want in zip(outs[0]["logprobs"][step], ref["logprobs"][step]):
            assert np.allclose(got, want, rtol=REL, atol=1e-5)


def test_every_lora_gradient_equals_tp1(trained):
    ref, outs, _, _ = trained
    for step in range(len(ref["grads"])):
        assert set(outs[0]["grads"][step]) == set(ref["grads"][step])
        for name, want in ref["grads"][step].items():
            assert want.abs().max() > 0, name  # B is non-zero, so gradients reach every tensor
            assert _close(outs[0]["grads"][step][name], want, REL if step == 0 else LATER_REL), name
        assert outs[0]["grad_norm"][step] == pytest.approx(ref["grad_norm"][step], rel=REL if step == 0 else LATER_REL)
        assert outs[1]["grad_norm"][step] == outs[0]["grad_norm"][step]


def test_adamw_steps_equal_tp1(trained):
    ref, outs, _, _ = trained
    for name, want in ref["params"].items():
        assert (outs[0]["params"][name] - want).abs().max().item() <= PARAM_ABS, name
        assert _close(outs[0]["exp_avg"][name], ref["exp_avg"][name], LATER_REL), name


def test_replicated_tensors_stay_identical_on_every_rank(trained, tp_models):
    _, outs, _, path = trained
    cfg = read_config(path)
    shards = [plan_shard(cfg, r, 2) for r in range(2)]
    replicated = 0
    for name in outs[0]["local_params"]:
        pieces = [lora_name_piece(name, s, 4)[0] for s in shards]
        if pieces[0].replicas == 2 and (pieces[0].start, pieces[0].end) == (pieces[1].start, pieces[1].end):
            assert torch.equal(outs[0]["local_params"][name], outs[1]["local_params"][name]), name
            replicated += 1
    assert replicated > 0


def test_checkpoint_saved_at_tp2_loads_at_tp1(trained):
    ref, outs, saved, path = trained
    trainer = Trainer(load_model(path, torch.float32, "cpu"), torch.device("cpu"))
    trainer.load("back", saved, with_optimizer=True)
    opt = trainer._runs["back"].optimizer  # noqa: SLF001
    assert opt.step_count == len(ref["loss"])
    for name, want in ref["params"].items():
        assert torch.equal(opt.params[name].detach(), outs[0]["params"][name]), name  # what the ranks held
        assert (opt.params[name].detach() - want).abs().max().item() <= PARAM_ABS, name
        assert _close(opt.exp_avg[name], ref["exp_avg"][name], LATER_REL), name


def test_checkpoint_saved_at_tp2_loads_back_at_tp2(trained):
    """Every rank reads the whole checkpoint and keeps exactly the pieces it saved (weights and moments)."""
    _, outs, _, _ = trained
    for rank_out in outs:
        for name, (p, m, v) in rank_out["local_state"].items():
            p2, m2, v2 = rank_out["reloaded_local"][name]
            assert torch.equal(p2, p) and torch.equal(m2, m) and torch.equal(v2, v), name
