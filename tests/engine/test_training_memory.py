"""Training memory: the runs' own state (fp32 masters, AdamW moments, gradients, a batch's copies of them) comes
out of the budget, so many runs shrink micro-batches and then refuse new runs with a message, never an OOM."""

import numpy as np
import pytest
import torch

from tinkerbell.engine.lora import AdapterWeights, LoraSpec
from tinkerbell.engine.models.loader import load_model
from tinkerbell.engine.training import Trainer
from tinkerbell.engine.training_memory import MIN_TRAINABLE_TOKENS, PASS_GRAD_BYTES, RUN_STATE_BYTES, MemoryPlan, \
    adapter_elements, plan_memory
from tinkerbell.engine.training_params import pack
from tinkerbell.engine.types import EngineUserError, TrainDatum

CPU = torch.device("cpu")
SPEC = LoraSpec(rank=4)
PER_TOKEN = 100  # bytes a token costs checkpointed in `_plan` (2 layers × 1 + one recomputed layer's 50 + 48)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir, torch.float32, "cpu")


def _plan(budget: int, state_at_plan: int | None = 0) -> MemoryPlan:
    return MemoryPlan(budget_bytes=budget, layer_bytes_per_token=50, checkpoint_bytes_per_token=1,
                      other_bytes_per_token=48, num_layers=2, state_at_plan=state_at_plan)


def _run_bytes(model) -> int:
    """One run's state plus what it adds to a batch (its float32 copy, the pass's own gradients)."""
    return (RUN_STATE_BYTES + 4 + PASS_GRAD_BYTES) * adapter_elements(model.cfg, SPEC)


def test_adapter_elements_count_every_a_and_b(model):
    for spec in (SPEC, LoraSpec(rank=8, train_attn=False), LoraSpec(rank=2, train_mlp=False, train_unembed=False)):
        packed = pack(AdapterWeights.init(model.cfg, spec, seed=0))
        assert adapter_elements(model.cfg, spec) == packed.flat.numel()
        assert adapter_elements(model.cfg, spec, world=3) == -(-packed.flat.numel() // 3)


def test_a_fixed_plan_without_state_accounting_is_unchanged_by_runs():
    plan = _plan(10_000, state_at_plan=None)
    assert plan.after_state(10**9) is plan


def test_state_is_charged_beyond_what_the_measured_budget_already_excluded():
    plan = _plan(10_000, state_at_plan=3_000)
    assert plan.after_state(3_000).budget_bytes == 10_000
    assert plan.after_state(7_000).budget_bytes == 6_000
    assert plan.after_state(10**9).budget_bytes == 0


def test_the_measured_cpu_plan_charges_every_run(model):
    assert plan_memory(model, 1024, resident_state_bytes=12345).state_at_plan == 0


def test_runs_created_after_the_plan_shrink_the_longest_datum(model):
    n = adapter_elements(model.cfg, SPEC)
    trainer = Trainer(model, CPU, memory=_plan(3 * RUN_STATE_BYTES * n + (4 + PASS_GRAD_BYTES) * n
                                                + 1500 * PER_TOKEN))
    trainer.create("a", SPEC, seed=0)
    vocab = model.cfg.vocab_size
    data = [_datum_of(vocab, 2000)]
    trainer.prepare("a", data, "cross_entropy", None, False)  # fits beside one run
    trainer.create("b", SPEC, seed=1)
    trainer.create("c", SPEC, seed=2)
    limit = trainer._plan_with([SPEC]).max_sequence_tokens
    assert limit == 1500
    with pytest.raises(EngineUserError, match=rf"a datum has 2000 tokens; .* at most {limit} tokens per datum"):
        trainer.prepare("a", data, "cross_entropy", None, False)
    trainer.remove("c")  # ending a run gives its memory back
    trainer.prepare("a", data, "cross_entropy", None, False)


def test_a_batch_of_many_runs_gets_smaller_micro_batches(model):
    per_run = _run_bytes(model)
    trainer = Trainer(model, CPU, memory=_plan(4 * RUN_STATE_BYTES * adapter_elements(model.cfg, SPEC)
                                                + 5000 * PER_TOKEN))
    for name in "abcd":
        trainer.create(name, SPEC, seed=0)
    one = trainer._plan_with([SPEC]).max_tokens(checkpointed=True)
    four = trainer._plan_with([SPEC] * 4).max_tokens(checkpointed=True)
    assert one - four == pytest.approx(3 * (per_run - RUN_STATE_BYTES * adapter_elements(model.cfg, SPEC))
                                       / PER_TOKEN, abs=1)


def test_a_run_that_would_leave_no_training_memory_is_refused(model, tmp_path):
    per_run = _run_bytes(model)
    trainer = Trainer(model, CPU, memory=_plan(2 * per_run + MIN_TRAINABLE_TOKENS * PER_TOKEN))
    trainer.create("a", SPEC, seed=0)
    trainer.create("b", SPEC, seed=1)
    with pytest.raises(EngineUserError, match=r"no training memory left for another LoRA adapter of rank 4 "
                                              r"\([\d.]+ MiB .*\): the 2 runs on this server hold"):
        trainer.create("c", SPEC, seed=2)
    assert not trainer.has("c")
    trainer.save("a", tmp_path, with_optimizer=False, base_model="tiny")
    with pytest.raises(EngineUserError, match="no training memory left"):  # loading a checkpoint is a new run too
        trainer.load("c", tmp_path, with_optimizer=False)
    trainer.remove("b")
    trainer.create("c", SPEC, seed=2)


def _datum_of(vocab: int, n: int) -> TrainDatum:
    return TrainDatum(np.arange(n) % vocab, {"target_tokens": np.arange(1, n + 1) % vocab,
                                             "weights": np.ones(n, np.float32)})
