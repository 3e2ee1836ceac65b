"""The Trainer on a real (tiny) Llama: losses over chunked logprobs, accumulation, isolation of runs,
checkpoints, learning, and user errors."""

import numpy as np
import pytest
import torch

from tinkerbell.engine import training_lora
from tinkerbell.engine.batch import BatchContext
from tinkerbell.engine.lora import LoraBatch, LoraSegment, LoraSpec
from tinkerbell.engine.losses import LOSSES, LossConfig
from tinkerbell.engine.models.loader import load_model
from tinkerbell.engine.training import Trainer
from tinkerbell.engine.training_forward import PackedAttention
from tinkerbell.engine.training_memory import MemoryPlan
from tinkerbell.engine.types import LOSS_FUNCTIONS, AdamParams, EngineUserError, TrainDatum

CPU = torch.device("cpu")
HP = AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=1.0)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir, torch.float32, "cpu")


def _datum(g: torch.Generator, vocab: int, n: int, k: int = 0) -> TrainDatum:
    """A datum carrying every loss's inputs; RL inputs keep ratios near 1 so no loss is degenerate."""
    shape = (n, k) if k else (n,)
    inputs = {
        "target_tokens": torch.randint(0, vocab, shape, generator=g).numpy(),
        "weights": (torch.rand(shape, generator=g) * 2 - 0.5).numpy(),
        "advantages": torch.randn(shape, generator=g).numpy(),
        "logprobs": np.full(shape, -6.0, np.float32) + torch.randn(shape, generator=g).numpy() * 0.1,
        "sequence_ratio_mask": (torch.rand(shape, generator=g) > 0.3).float().numpy(),
    }
    return TrainDatum(torch.randint(0, vocab, (n,), generator=g).numpy(), inputs)


def _data(vocab: int, seed: int = 0, lengths=(6, 11, 4)) -> list[TrainDatum]:
    g = torch.Generator().manual_seed(seed)
    return [_datum(g, vocab, n) for n in lengths]


def _weights(trainer: Trainer, run_id: str) -> list[torch.Tensor]:
    return [t.detach().clone() for t in trainer.snapshot(run_id).parameters()]


@pytest.mark.parametrize("loss_fn", LOSS_FUNCTIONS)
def test_losses_over_chunked_logprobs_match_full_logits(model, loss_fn):
    """Chunked logprobs (3-row chunks crossing datum boundaries, [N] and [N, K] mixed) equal log_softmax of the
    full logits, and the loss is the protocol's formula summed over those logprobs."""
    vocab = model.cfg.vocab_size
    trainer = Trainer(model, CPU, logits_chunk_elems=3 * vocab)
    trainer.create("r", LoraSpec(rank=4), seed=0)
    g = torch.Generator().manual_seed(1)
    k = 2 if loss_fn == "cross_entropy" else 0
    data = [_datum(g, vocab, 5), _datum(g, vocab, 7, k), _datum(g, vocab, 4)]
    config = {"beta": 0.2} if loss_fn == "dro" else {}
    result = trainer.forward_backward("r", data, loss_fn, config, forward_only=True)

    adapter = trainer.snapshot("r")
    lengths = [len(d.tokens) for d in data]
    ctx = BatchContext.for_packed(lengths, LoraBatch([LoraSegment(0, sum(lengths), adapter)]))
    with torch.no_grad():
        full = model(torch.as_tensor(np.concatenate([d.tokens for d in data])), ctx).log_softmax(-1)
    total, start = 0.0, 0
    for d, out, n in zip(data, result.outputs, lengths):
        t = torch.as_tensor(d.inputs["target_tokens"])
        rows = full[start : start + n]
        ref = rows.gather(-1, t[:, None]).squeeze(-1) if t.ndim == 1 else rows.gather(-1, t)
        start += n
        assert out["logprobs"].dtype == np.float32 and out["logprobs"].shape == t.shape
        assert np.abs(out["logprobs"] - ref.numpy()).max() <= 1e-5
        inputs = {key: torch.as_tensor(d.inputs[key]) for key in LOSSES[loss_fn].float_inputs() if key in d.inputs}
        want = LOSSES[loss_fn].compute(ref, inputs, LossConfig.parse(config))
        assert np.abs(out["elementwise_loss"] - want.numpy()).max() <= 1e-4
        total += want.sum().item()
    assert result.metrics["loss:sum"] == pytest.approx(total, rel=1e-5, abs=1e-4)
    assert result.metrics["ntokens:sum"] == sum(lengths)
    assert all(key.count(":") == 1 for key in result.metrics)


def test_gradient_accumulates_across_calls(model):
    trainer = Trainer(model, CPU)
    data = _data(model.cfg.vocab_size)
    for run in ("split", "joint"):
        trainer.create(run, LoraSpec(rank=4), seed=5)
    for _ in range(2):  # two steps, so A (whose first gradient is 0 while B = 0) moves too
        a = trainer.forward_backward("split", data[:1], "cross_entropy", {}, False)
        b = trainer.forward_backward("split", data[1:], "cross_entropy", {}, False)
        joint = trainer.forward_backward("joint", data, "cross_entropy", {}, False)
        assert a.metrics["loss:sum"] + b.metrics["loss:sum"] == pytest.approx(joint.metrics["loss:sum"], rel=1e-5)
        m1, m2 = trainer.optim_step("split", HP), trainer.optim_step("joint", HP)
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    for x, y in zip(_weights(trainer, "split"), _weights(trainer, "joint")):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_forward_only_accumulates_nothing(model):
    trainer = Trainer(model, CPU)
    trainer.create("r", LoraSpec(rank=4), seed=0)
    before = _weights(trainer, "r")
    trainer.forward_backward("r", _data(model.cfg.vocab_size), "cross_entropy", {}, forward_only=True)
    assert trainer.optim_step("r", HP)["grad_norm"] == 0.0
    assert all(torch.equal(x, y) for x, y in zip(before, _weights(trainer, "r")))


def test_runs_do_not_affect_each_other(model):
    trainer = Trainer(model, CPU)
    trainer.create("a", LoraSpec(rank=4), seed=1)
    trainer.create("b", LoraSpec(rank=8, train_unembed=False), seed=2)
    data = _data(model.cfg.vocab_size)
    b_before = trainer.forward_backward("b", data, "cross_entropy", {}, forward_only=True)
    b_weights = _weights(trainer, "b")
    for _ in range(3):
        trainer.forward_backward("a", data, "cross_entropy", {}, False)
        trainer.optim_step("a", HP)
    b_after = trainer.forward_backward("b", data, "cross_entropy", {}, forward_only=True)
    assert all(np.array_equal(x["logprobs"], y["logprobs"]) for x, y in zip(b_before.outputs, b_after.outputs))
    assert all(torch.equal(x, y) for x, y in zip(b_weights, _weights(trainer, "b")))
    assert trainer.optim_step("b", HP)["grad_norm"] == 0.0
    trainer.remove("a")
    assert not trainer.has("a") and trainer.has("b") and trainer.spec("b").rank == 8


def _small_plan(tokens: int) -> MemoryPlan:
    """A memory plan whose micro-batches hold `tokens` tokens without checkpointing (longer datums: with)."""
    return MemoryPlan(budget_bytes=tokens * 100, layer_bytes_per_token=50, checkpoint_bytes_per_token=1,
                      other_bytes_per_token=0, num_layers=2)


@pytest.mark.parametrize("gpu_paths, plan, lora_form",
                         [(False, None, ""), (True, None, ""), (True, None, "per-run"), (True, None, "segmented"),
                          (True, 9, ""), (True, 9, "segmented"), (False, 9, "")],
                         ids=["reference", "gpu-paths", "gpu-paths-per-run-lora", "gpu-paths-segmented-lora",
                              "gpu-paths-microbatched", "gpu-paths-segmented-microbatched", "microbatched"])
def test_packed_runs_equal_separate_calls(model, monkeypatch, gpu_paths, plan, lora_form):
    """Several runs in one batch (the engine's path) give each run what its own call would: logprobs, losses,
    gradients and updated weights (float32, 1e-5 relative). Also with the GPU paths (padded attention over
    ragged lengths, stacked LoRA of different ranks; with one rank and the same modules everywhere the
    segmented form, views of the runs' packed buffers) and with the batch split into micro-batches that cut
    requests apart (gradients accumulate across them), both run here on the CPU."""
    if lora_form == "per-run":  # each run's rows through its own adapter's matmuls (the GPU path for long requests)
        monkeypatch.setattr(training_lora, "SEGMENT_MIN_ROWS", 1)
    segmented = lora_form == "segmented"
    calls = []
    real = training_lora.SegmentedLoraAdd.apply
    monkeypatch.setattr(training_lora.SegmentedLoraAdd, "apply", lambda *a: calls.append(1) or real(*a))
    vocab = model.cfg.vocab_size
    memory = _small_plan(plan) if plan else None
    packed = Trainer(model, CPU, logits_chunk_elems=5 * vocab, gpu_paths=gpu_paths, memory=memory)
    alone = Trainer(model, CPU)
    reqs = [("a", _data(vocab, 1, (5, 3)), "cross_entropy", False), ("b", _data(vocab, 2, (7,)), "ppo", False),
            ("c", _data(vocab, 3, (4, 6)), "cross_entropy", True), ("d", _data(vocab, 4, (2, 9, 3)), "gspo", False),
            ("a", _data(vocab, 5, (4,)), "cross_entropy", False)]
    for t in (packed, alone):
        for i, run in enumerate("abcd"):
            spec = LoraSpec(rank=4) if segmented else LoraSpec(rank=4 + 2 * i, train_mlp=run != "c")
            t.create(run, spec, seed=i)
            t.forward_backward(run, _data(vocab, 9), "cross_entropy", {}, False)  # B != 0 after a step
            t.optim_step(run, HP)
    calls.clear()
    results = packed.run_segments([packed.prepare(r, d, fn, {}, fo) for r, d, fn, fo in reqs])
    assert bool(calls) == segmented
    for (run, data, fn, fo), res in zip(reqs, results):
        ref = alone.forward_backward(run, data, fn, {}, fo)
        assert res.metrics["loss:sum"] == pytest.approx(ref.metrics["loss:sum"], rel=1e-5, abs=1e-6)
        for x, y in zip(res.outputs, ref.outputs):
            np.testing.assert_allclose(x["logprobs"], y["logprobs"], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(x["elementwise_loss"], y["elementwise_loss"], rtol=1e-5, atol=1e-6)
    for run in "abcd":
        for x, y in zip(packed._runs[run].weights.parameters(), alone._runs[run].weights.parameters()):
            if y.grad is None:
                assert x.grad is None
                continue
            assert ((x.grad - y.grad).norm() / y.grad.norm().clamp(min=1e-12)).item() <= 1e-5
    # Adam's first steps move each weight by ~lr·sign(gradient), which turns rounding in a near-zero gradient
    # entry into a full step; an eps above that rounding (float32 sums in another order: ~1e-6 relative) keeps
    # the weights a faithful check of the gradients.
    hp = AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=1.0, eps=1e-5)
    steps = packed.optim_steps([(run, hp) for run in "abcd"])
    for run, m1 in zip("abcd", steps):
        m2 = alone.optim_step(run, hp)
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5, abs=1e-9)
        for x, y in zip(_weights(packed, run), _weights(alone, run)):
            assert ((x - y).norm() / y.norm()).item() <= 1e-5


@pytest.mark.parametrize("loss_fn", ["gspo", "cross_entropy"])
def test_consecutive_requests_with_one_loss_share_its_computation_and_equal_separate_calls(model, loss_fn):
    """Three runs' requests with the same loss in a row are one loss computation (a sequence-level loss still
    normalises per datum, across the merged requests); each run's losses and gradients are its own call's."""
    vocab = model.cfg.vocab_size
    packed, alone = Trainer(model, CPU, gpu_paths=True), Trainer(model, CPU)
    reqs = [(run, _data(vocab, 20 + i, (3 + i, 5))) for i, run in enumerate(("x", "y", "z"))]
    for t in (packed, alone):
        for i, (run, _) in enumerate(reqs):
            t.create(run, LoraSpec(rank=4), seed=i)
            t.forward_backward(run, _data(vocab, 9), "cross_entropy", {}, False)
            t.optim_step(run, HP)
    results = packed.run_segments([packed.prepare(r, d, loss_fn, {}, False) for r, d in reqs])
    for (run, data), res in zip(reqs, results):
        ref = alone.forward_backward(run, data, loss_fn, {}, False)
        assert res.metrics["loss:sum"] == pytest.approx(ref.metrics["loss:sum"], rel=1e-5, abs=1e-6)
        for x, y in zip(res.outputs, ref.outputs):
            np.testing.assert_allclose(x["elementwise_loss"], y["elementwise_loss"], rtol=1e-5, atol=1e-6)
        for x, y in zip(packed._runs[run].weights.parameters(), alone._runs[run].weights.parameters()):
            assert ((x.grad - y.grad).norm() / y.grad.norm().clamp(min=1e-12)).item() <= 1e-5


def test_microbatches_cut_at_datum_boundaries():
    from tinkerbell.engine.training import TrainSegment, _split

    def seg(*lengths):
        return TrainSegment("r", [TrainDatum(np.zeros(n, np.int64), {}) for n in lengths], None, None, False)

    segments = [seg(4, 4), seg(3), seg(9, 1, 1)]
    assert _split(segments, 100) == [[(0, 0, 2), (1, 0, 1), (2, 0, 3)]]
    assert _split(segments, 8) == [[(0, 0, 2)], [(1, 0, 1)], [(2, 0, 1)], [(2, 1, 3)]]
    assert _split(segments, 11) == [[(0, 0, 2), (1, 0, 1)], [(2, 0, 3)]]


def test_over_large_requests_are_refused_with_the_limit(model):
    plan = _small_plan(10)
    trainer = Trainer(model, CPU, memory=plan)
    trainer.create("r", LoraSpec(rank=2), seed=0)
    vocab = model.cfg.vocab_size
    limit = plan.max_sequence_tokens
    with pytest.raises(EngineUserError, match=rf"a datum has {limit + 1} tokens; .* at most {limit} tokens per datum"):
        trainer.forward_backward("r", _data(vocab, lengths=(3, limit + 1)), "cross_entropy", {}, False)
    many = _data(vocab, lengths=(limit,) * (plan.max_request_tokens // limit + 1))
    with pytest.raises(EngineUserError, match=rf"at most {plan.max_request_tokens} tokens per forward_backward"):
        trainer.forward_backward("r", many, "cross_entropy", {}, False)
    assert trainer.optim_step("r", HP)["grad_norm"] == 0.0


def test_fused_optimizer_steps_equal_per_run_steps_and_fail_alone(model):
    """`optim_steps` over several runs (different hyper-parameters, a bad one, a repeated run) equals stepping
    each run alone, bit for bit."""
    vocab = model.cfg.vocab_size
    fused, single = Trainer(model, CPU), Trainer(model, CPU)
    hps = {"a": HP, "b": AdamParams(learning_rate=3e-2, beta1=0.8, weight_decay=0.0, grad_clip_norm=0.0),
           "c": AdamParams(learning_rate=1e-3, grad_clip_norm=1e-3)}
    for t in (fused, single):
        for i, run in enumerate(hps):
            t.create(run, LoraSpec(rank=2 + i), seed=i)
    for step in range(3):
        for t in (fused, single):
            for i, run in enumerate(hps):
                t.forward_backward(run, _data(vocab, 10 * step + i), "cross_entropy", {}, False)
        out = fused.optim_steps([(r, hp) for r, hp in hps.items()] + [("ghost", HP), ("a", AdamParams(beta2=1.0))])
        assert isinstance(out[3], EngineUserError) and isinstance(out[4], EngineUserError)
        for run, m in zip(hps, out):
            assert m == single.optim_step(run, hps[run])
        for run in hps:
            assert all(torch.equal(x, y) for x, y in zip(_weights(fused, run), _weights(single, run)))


def test_padded_attention_equals_the_per_sequence_loop():
    g = torch.Generator().manual_seed(0)
    for lengths in ([5, 9, 3, 9, 1, 20], [8, 8, 8], [7]):
        t = sum(lengths)
        q, k, v = (torch.randn(t, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
        ref = PackedAttention(lengths, CPU, padded=False)(q, k, v)
        out = PackedAttention(lengths, CPU, padded=True)(q, k, v)
        grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        for x, y in zip(torch.autograd.grad(ref, (q, k, v), grad), torch.autograd.grad(out, (q, k, v), grad)):
            torch.testing.assert_close(x, y)
        torch.testing.assert_close(out, ref)


def test_save_load_round_trip(model, tmp_path):
    trainer = Trainer(model, CPU)
    data = _data(model.cfg.vocab_size)
    trainer.create("orig", LoraSpec(rank=4, train_mlp=False), seed=0)
    for _ in range(2):
        trainer.forward_backward("orig", data, "cross_entropy", {}, False)
        trainer.optim_step("orig", HP)
    written = trainer.save("orig", tmp_path / "full", with_optimizer=True, base_model="tiny")
    assert written == sum(f.stat().st_size for f in (tmp_path / "full").iterdir())
    trainer.save("orig", tmp_path / "weights", with_optimizer=False, base_model="tiny")

    assert trainer.load("full", tmp_path / "full", with_optimizer=True) == trainer.spec("orig")
    trainer.load("weights", tmp_path / "weights", with_optimizer=False)
    ref = trainer.forward_backward("orig", data, "cross_entropy", {}, True)
    for run in ("full", "weights"):
        out = trainer.forward_backward(run, data, "cross_entropy", {}, True)
        assert all(np.array_equal(x["logprobs"], y["logprobs"]) for x, y in zip(out.outputs, ref.outputs))
    for run in ("orig", "full"):  # the restored Adam state makes the next step identical
        trainer.forward_backward(run, data, "cross_entropy", {}, False)
        trainer.optim_step(run, HP)
    assert all(torch.equal(x, y) for x, y in zip(_weights(trainer, "orig"), _weights(trainer, "full")))

    with pytest.raises(EngineUserError, match="no optimizer state"):
        trainer.load("nope", tmp_path / "weights", with_optimizer=True)
    assert not trainer.has("nope")
    with pytest.raises(EngineUserError, match="already exists"):
        trainer.load("full", tmp_path / "full", with_optimizer=False)


def test_snapshot_is_a_detached_copy_in_model_dtype(model):
    trainer = Trainer(model, CPU)
    trainer.create("r", LoraSpec(rank=2), seed=0)
    snap = trainer.snapshot("r")
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in snap.parameters())
    trainer.forward_backward("r", _data(model.cfg.vocab_size), "cross_entropy", {}, False)
    trainer.optim_step("r", HP)
    assert not all(torch.equal(x, y) for x, y in zip(snap.parameters(), _weights(trainer, "r")))


def test_snapshot_after_a_step_has_the_stepped_weights(model):
    trainer = Trainer(model, CPU)
    trainer.create("r", LoraSpec(rank=2), seed=0)
    trainer.snapshot("r")  # the first snapshot keeps views of the masters; later ones must see their updates
    trainer.forward_backward("r", _data(model.cfg.vocab_size), "cross_entropy", {}, False)
    trainer.optim_step("r", HP)
    snap = trainer.snapshot("r")
    assert all(torch.equal(x, y.detach()) for x, y in zip(snap.parameters(), _weights(trainer, "r")))


def test_learning_lowers_the_loss(model, tiny_llama_dir):
    from tinkerbell.engine.models.loader import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    prompt = tok.encode("User: What is your name?\nAssistant:")
    completion = tok.encode(" My name is Tinkerbell.")
    seq = prompt + completion
    weights = np.array([0.0] * (len(prompt) - 1) + [1.0] * len(completion), np.float32)
    datum = TrainDatum(np.array(seq[:-1]), {"target_tokens": np.array(seq[1:]), "weights": weights})
    trainer = Trainer(model, CPU)
    trainer.create("r", LoraSpec(rank=8), seed=0)
    losses = []
    for _ in range(30):
        losses.append(trainer.forward_backward("r", [datum], "cross_entropy", {}, False).metrics["loss:sum"])
        trainer.optim_step("r", AdamParams(learning_rate=1e-2))
    final = trainer.forward_backward("r", [datum], "cross_entropy", {}, True).metrics["loss:sum"]
    assert final < 0.1 * losses[0], (losses[0], final)
    stats = trainer.stats()
    assert stats["runs"] == 1 and stats["optim_steps"] == 30 and stats["tokens_trained"] == 30 * len(datum.tokens)


def test_user_errors_name_the_field(model):
    trainer = Trainer(model, CPU)
    trainer.create("r", LoraSpec(rank=2), seed=0)
    vocab = model.cfg.vocab_size
    good = _data(vocab, lengths=(4,))[0]
    bad_vocab = TrainDatum(good.tokens, {**good.inputs, "target_tokens": np.array([1, 2, vocab, 3])})
    with pytest.raises(EngineUserError, match=rf"data\[1\]\.loss_fn_inputs\.target_tokens holds token id {vocab}"):
        trainer.forward_backward("r", [good, bad_vocab], "cross_entropy", {}, False)
    bad_shape = TrainDatum(good.tokens, {**good.inputs, "weights": np.ones((4, 2), np.float32)})
    with pytest.raises(EngineUserError, match=r"data\[0\]\.loss_fn_inputs\.weights has shape \[4, 2\]; want \[4\]"):
        trainer.forward_backward("r", [bad_shape], "cross_entropy", {}, False)
    missing = TrainDatum(good.tokens, {k: v for k, v in good.inputs.items() if k != "advantages"})
    with pytest.raises(EngineUserError, match=r"data\[0\]\.loss_fn_inputs\.advantages is required for importance_"):
        trainer.forward_backward("r", [missing], "importance_sampling", {}, False)
    with pytest.raises(EngineUserError, match="stable_reinforce"):
        trainer.forward_backward("r", [good], "stable_reinforce", {}, False)
    assert trainer.optim_step("r", HP)["grad_norm"] == 0.0  # nothing ran for the refused requests
    for call in (lambda: trainer.forward_backward("ghost", [good], "cross_entropy", {}, False),
                 lambda: trainer.optim_step("ghost", HP), lambda: trainer.snapshot("ghost"),
                 lambda: trainer.remove("ghost")):
        with pytest.raises(EngineUserError, match="'ghost'"):
            call()
    with pytest.raises(EngineUserError, match="already exists"):
        trainer.create("r", LoraSpec(rank=2), seed=0)


def test_bf16_base_model_trains_fp32_masters(tiny_llama_dir):
    """On GPU the base model is bf16; the masters, their gradients and the optimizer stay fp32."""
    trainer = Trainer(load_model(tiny_llama_dir, torch.bfloat16, "cpu"), CPU)
    trainer.create("r", LoraSpec(rank=4), seed=0)
    data = _data(trainer.cfg.vocab_size)
    first = trainer.forward_backward("r", data, "cross_entropy", {}, False)
    assert all(o["logprobs"].dtype == np.float32 for o in first.outputs)
    master = trainer._runs["r"].weights
    assert all(t.dtype == torch.float32 and t.grad is not None for t in master.parameters())
    for _ in range(3):
        trainer.optim_step("r", AdamParams(learning_rate=1e-2))
        last = trainer.forward_backward("r", data, "cross_entropy", {}, False)
    assert last.metrics["loss:sum"] < first.metrics["loss:sum"]
    assert all(t.dtype == torch.bfloat16 for t in trainer.snapshot("r").parameters())


def test_autograd_keeps_no_full_vocab_logits(model):
    """Outside the checkpointed chunks autograd saves nothing vocabulary-wide: each chunk's [rows, vocab] logits
    are rebuilt in backward instead of being held for the whole batch."""
    vocab = model.cfg.vocab_size
    trainer = Trainer(model, CPU, logits_chunk_elems=4 * vocab)
    trainer.create("r", LoraSpec(rank=2), seed=0)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.forward_backward("r", _data(vocab), "cross_entropy", {}, False)
    assert saved and not [s for s in saved if s and s[-1] == vocab]


def _grads(trainer: Trainer, run_id: str) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in trainer._get(run_id).weights.parameters()]


def _fail_on_micro_batch(trainer: Trainer, monkeypatch, n: int, exc: BaseException) -> None:
    """Fault injection: the pass's micro-batch `n` (from 1) raises `exc` after the earlier ones ran for real."""
    real, calls = trainer._micro_batch, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(*args, **kw)

    monkeypatch.setattr(trainer, "_micro_batch", flaky)


def test_a_pass_failing_midway_leaves_every_runs_gradients_as_they_were(model, monkeypatch):
    vocab = model.cfg.vocab_size
    data = _data(vocab, lengths=(6, 7, 5))  # three micro-batches of the 9-token plan
    trainers = [Trainer(model, CPU, memory=_small_plan(9)) for _ in range(2)]
    for t in trainers:
        t.create("r", LoraSpec(rank=4), seed=3)
        t.create("s", LoraSpec(rank=4), seed=4)
        t.forward_backward("r", data, "cross_entropy", {}, False)
    before = _grads(trainers[0], "r")
    _fail_on_micro_batch(trainers[0], monkeypatch, 2, RuntimeError("injected"))
    segs = [trainers[0].prepare(run, data, "cross_entropy", {}, False) for run in ("r", "s")]
    with pytest.raises(RuntimeError, match="injected"):
        trainers[0].run_segments(segs)
    after = _grads(trainers[0], "r")
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(g is None for g in _grads(trainers[0], "s"))  # no partial gradient from micro-batch 1
    monkeypatch.undo()
    for t in trainers:  # the same request again, then a step: as if the failed pass never happened
        t.forward_backward("r", data, "cross_entropy", {}, False)
        t.optim_step("r", HP)
    for a, b in zip(_weights(trainers[0], "r"), _weights(trainers[1], "r")):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_running_out_of_memory_in_a_pass_says_what_to_do(model, monkeypatch):
    from tinkerbell.engine.types import EngineCapacityError

    trainer = Trainer(model, CPU)
    trainer.create("r", LoraSpec(rank=4), seed=0)
    _fail_on_micro_batch(trainer, monkeypatch, 1, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    with pytest.raises(EngineCapacityError, match=r"ran out of memory in a forward_backward pass of 21 tokens .*"
                                                  r"gradients are as they were .* fewer tokens per request"):
        trainer.forward_backward("r", _data(model.cfg.vocab_size), "cross_entropy", {}, False)
    assert all(g is None for g in _grads(trainer, "r"))
