"""Training on the sharded model (gloo, 2 or 4 ranks on the CPU) equals training unsharded: target logprobs,
losses, every LoRA gradient, the AdamW steps (replicated tensors stay identical on every rank), and a
checkpoint saved at TP T is the whole adapter and optimizer state, which loads at TP 1 and back at TP T."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.engine.tp import ranks
from tinkerbell.engine.models.loader import load_model, read_config
from tinkerbell.engine.tp.shard import lora_name_piece, plan_shard
from tinkerbell.engine.training import Trainer

REL = 1e-5
# Later steps start from parameters that already differ by float32 rounding between TP 1 and TP T (different
# summation orders): their gradients are compared at a few times the first step's tolerance.
LATER_REL = 5e-5
# Adam divides each gradient entry by its own magnitude, so an entry near zero turns rounding into a visible
# difference of its update: parameters after the steps agree to a small fraction of one step (lr = 1e-2 in
# ranks.train_steps), where a wrong step would be off by about a whole one.
PARAM_ABS = 2e-3 * 1e-2
CASES, IDS = ranks.CASES, ranks.CASE_IDS


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = REL) -> bool:
    return got.shape == want.shape and (got - want).abs().max().item() <= rel * max(want.abs().max().item(), 1e-3)


@pytest.fixture(params=CASES, ids=IDS)
def trained(request, tp_run):
    """(TP 1 reference, TP T rank outputs, TP T checkpoint dir, model path) for one (model, T)."""
    run = tp_run(*request.param)
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
        assert all(o["grad_norm"][step] == outs[0]["grad_norm"][step] for o in outs)


def test_adamw_steps_equal_tp1(trained):
    ref, outs, _, _ = trained
    for name, want in ref["params"].items():
        assert (outs[0]["params"][name] - want).abs().max().item() <= PARAM_ABS, name
        assert _close(outs[0]["exp_avg"][name], ref["exp_avg"][name], LATER_REL), name


def test_replicated_tensors_stay_identical_on_every_rank(trained):
    """After the steps, the ranks holding the same piece of a replicated tensor hold identical values (bit for
    bit: every rank applies AdamW to the same summed gradient with the same global norm)."""
    _, outs, _, path = trained
    cfg = read_config(path)
    shards = [plan_shard(cfg, r, len(outs)) for r in range(len(outs))]
    compared = 0
    for name in outs[0]["local_params"]:
        holders: dict[tuple, list[int]] = {}
        for r, s in enumerate(shards):
            piece = lora_name_piece(name, s, 4)[0]
            if piece.replicas > 1:
                holders.setdefault((piece.dim, piece.start, piece.end), []).append(r)
        for group in holders.values():
            assert len(group) > 1, name
            for r in group[1:]:
                assert torch.equal(outs[r]["local_params"][name], outs[group[0]]["local_params"][name]), (name, r)
                compared += 1
    assert compared > 0


def test_checkpoint_saved_at_tp_t_loads_at_tp1(trained):
    ref, outs, saved, path = trained
    trainer = Trainer(load_model(path, torch.float32, "cpu"), torch.device("cpu"))
    trainer.load("back", saved, with_optimizer=True)
    opt = trainer._runs["back"].optimizer  # noqa: SLF001
    assert opt.step_count == len(ref["loss"])
    for name, want in ref["params"].items():
        assert torch.equal(opt.params[name].detach(), outs[0]["params"][name]), name  # what the ranks held
        assert (opt.params[name].detach() - want).abs().max().item() <= PARAM_ABS, name
        assert _close(opt.exp_avg[name], ref["exp_avg"][name], LATER_REL), name


def test_checkpoint_saved_at_tp_t_loads_back_at_tp_t(trained):
    """Every rank reads the whole checkpoint and keeps exactly the pieces it saved (weights and moments)."""
    _, outs, _, _ = trained
    for rank_out in outs:
        for name, (p, m, v) in rank_out["local_state"].items():
            p2, m2, v2 = rank_out["reloaded_local"][name]
            assert torch.equal(p2, p) and torch.equal(m2, m) and torch.equal(v2, v), name
