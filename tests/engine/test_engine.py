"""The engine thread: packed forward/backward of several runs equals running each alone; train → sampler in memory."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tinkerbell.engine.engine import Engine, EngineConfig
from tinkerbell.engine.lora import LoraSpec
from tinkerbell.engine.types import AdamParams, EngineUserError, SampleJob, TrainDatum


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    eng = Engine(EngineConfig(model=str(tiny_llama_dir), max_loras=2, max_lora_rank=8))
    yield eng
    eng.shutdown()


def _datum(seed: int, n: int = 8) -> TrainDatum:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 300, size=n + 1)
    return TrainDatum(tokens=ids[:-1], inputs={"target_tokens": ids[1:], "weights": np.ones(n, np.float32)})


def test_packed_forward_backward_of_two_runs_equals_each_alone(engine):
    spec = LoraSpec(rank=4)
    for run in ("p1", "p2", "s1", "s2"):
        engine.create_adapter(run, spec, seed=7).result()
    d1, d2 = _datum(1), _datum(2, n=5)
    # Hold the engine thread so both requests are queued together; the loop then packs them into one batch.
    gate = threading.Event()
    engine._call(lambda: gate.wait(10))
    batches = engine.stats()["train_batches"]
    f1 = engine.forward_backward("p1", [d1], "cross_entropy", {}, False)
    f2 = engine.forward_backward("p2", [d2], "cross_entropy", {}, False)
    gate.set()
    packed = [f1.result(), f2.result()]
    assert engine.stats()["train_batches"] == batches + 1
    alone = [engine.forward_backward("s1", [d1], "cross_entropy", {}, False).result()]
    alone.append(engine.forward_backward("s2", [d2], "cross_entropy", {}, False).result())
    for p, a in zip(packed, alone):
        assert p.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-5)
        np.testing.assert_allclose(p.outputs[0]["logprobs"], a.outputs[0]["logprobs"], rtol=1e-5, atol=1e-6)
    for run_p, run_s in (("p1", "s1"), ("p2", "s2")):
        engine.optim_step(run_p, AdamParams(learning_rate=1e-2)).result()
        engine.optim_step(run_s, AdamParams(learning_rate=1e-2)).result()
    after_p = engine.forward_backward("p1", [d1], "cross_entropy", {}, True).result()
    after_s = engine.forward_backward("s1", [d1], "cross_entropy", {}, True).result()
    assert after_p.metrics["loss:sum"] == pytest.approx(after_s.metrics["loss:sum"], rel=1e-5)


def test_a_bad_request_in_a_packed_batch_fails_alone(engine):
    engine.create_adapter("bad1", LoraSpec(rank=4), seed=0).result()
    good = engine.forward_backward("bad1", [_datum(3)], "cross_entropy", {}, True)
    bad = engine.forward_backward("bad1", [_datum(4)], "no_such_loss", {}, True)
    assert good.result().metrics["loss:sum"] > 0
    with pytest.raises(EngineUserError, match="no_such_loss"):
        bad.result()


def test_published_adapter_changes_samples_without_disk(engine):
    engine.create_adapter("pub", LoraSpec(rank=4), seed=0).result()
    d = _datum(5)
    for _ in range(20):
        engine.forward_backward("pub", [d], "cross_entropy", {}, False).result()
        engine.optim_step("pub", AdamParams(learning_rate=2e-2)).result()
    engine.publish_to_sampler("pub", "pub@1").result()
    prompt = [int(t) for t in d.tokens[:3]]
    job = SampleJob(prompt=prompt, max_tokens=5, temperature=0.0, stop_at_eos=False, adapter_key="pub@1")
    tuned = engine.sample(job).result().sequences[0].tokens
    assert tuned == [int(t) for t in d.inputs["target_tokens"][2:7]]
    base = engine.sample(SampleJob(prompt=prompt, max_tokens=5, temperature=0.0, stop_at_eos=False)).result()
    assert base.sequences[0].tokens != tuned


def test_a_run_with_a_long_queue_does_not_hold_up_another_run(engine, monkeypatch):
    import tinkerbell.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_PACKED_TRAIN_TOKENS", 32)  # 4 requests of 8 tokens per batch
    for run in ("busy", "quiet"):
        engine.create_adapter(run, LoraSpec(rank=4), seed=0).result()
    gate = threading.Event()
    engine._call(lambda: gate.wait(10))
    order: list[str] = []
    busy = [engine.forward_backward("busy", [_datum(i)], "cross_entropy", {}, False) for i in range(12)]
    quiet = engine.forward_backward("quiet", [_datum(99)], "cross_entropy", {}, False)
    for i, f in enumerate(busy):
        f.add_done_callback(lambda _f, i=i: order.append(f"busy{i}"))
    quiet.add_done_callback(lambda _f: order.append("quiet"))
    gate.set()
    quiet.result()
    for f in busy:
        f.result()
    # The quiet run's one request shares the first batch instead of waiting behind twelve.
    assert order.index("quiet") <= 2, order
    # Each run's own requests still run in order.
    assert [o for o in order if o.startswith("busy")] == [f"busy{i}" for i in range(12)]


def test_a_runs_optim_step_waits_for_its_earlier_forward_backward(engine):
    engine.create_adapter("ordered", LoraSpec(rank=4), seed=0).result()
    d = _datum(7)
    before = engine.forward_backward("ordered", [d], "cross_entropy", {}, True).result().metrics["loss:sum"]
    fb = engine.forward_backward("ordered", [d], "cross_entropy", {}, False)
    step = engine.optim_step("ordered", AdamParams(learning_rate=5e-2))
    after = engine.forward_backward("ordered", [d], "cross_entropy", {}, True)
    fb.result(), step.result()
    assert after.result().metrics["loss:sum"] < before  # the step used fb's gradient and ran before `after`


def test_optim_steps_due_together_run_as_one_update_and_a_refused_one_fails_alone(engine, monkeypatch):
    """Three runs' optim_steps queued at once: one fused AdamW update (Trainer.optim_steps called once with the
    two valid steps and the refused one), each run's result as if alone, the bad learning rate refused alone."""
    for run in ("o1", "o2", "o3", "a1"):
        engine.create_adapter(run, LoraSpec(rank=4), seed=3).result()
    for run in ("o1", "o2", "o3", "a1"):
        engine.forward_backward(run, [_datum(11)], "cross_entropy", {}, False).result()
    calls = []
    real = engine.trainer.optim_steps
    monkeypatch.setitem(engine.mirror._ops, "optims", lambda steps: calls.append(len(steps)) or real(steps))
    gate = threading.Event()
    engine._call(lambda: gate.wait(10))
    futs = [engine.optim_step("o1", AdamParams(learning_rate=1e-2)),
            engine.optim_step("o2", AdamParams(learning_rate=1e-2)),
            engine.optim_step("o3", AdamParams(learning_rate=-1.0))]
    gate.set()
    together = [futs[0].result(), futs[1].result()]
    with pytest.raises(EngineUserError, match="learning_rate"):
        futs[2].result()
    assert calls == [3]
    alone = engine.optim_step("a1", AdamParams(learning_rate=1e-2)).result()
    assert together[0]["grad_norm"] == pytest.approx(alone["grad_norm"], rel=1e-6)
    after = [engine.forward_backward(r, [_datum(11)], "cross_entropy", {}, True).result() for r in ("o1", "a1")]
    assert after[0].metrics["loss:sum"] == pytest.approx(after[1].metrics["loss:sum"], rel=1e-6)


def test_a_small_models_engine_thread_runs_its_cpu_ops_on_one_core(engine):
    # Off the main thread each OpenMP region pays a worker wake-up that a tiny model's ops never earn back.
    import torch

    assert engine._call(torch.get_num_threads).result(timeout=30) == 1


def test_stats_say_where_the_engine_threads_time_went(engine):
    """Training, other jobs and sampler steps each add their host time to `loop_seconds`."""
    engine.create_adapter("clock", LoraSpec(rank=4), seed=0).result()
    before = engine.stats()["loop_seconds"]
    engine.forward_backward("clock", [_datum(9)], "cross_entropy", {}, False).result()
    engine.optim_step("clock", AdamParams(learning_rate=1e-3)).result()
    engine.sample(SampleJob(prompt=[5, 6, 7], max_tokens=4, temperature=0.0, stop_at_eos=False)).result()
    after = engine.stats()["loop_seconds"]
    assert after["training"] > before["training"] and after["other_jobs"] > before["other_jobs"]
    assert after["sampling"] > before["sampling"] and after["sampler_steps"] >= before["sampler_steps"] + 4


def test_a_burst_of_several_runs_requests_is_one_packed_pass_and_a_lone_run_never_waits(tiny_llama_dir,
                                                                                         monkeypatch):
    """With the quiet time stretched to 5 s: two of three runs' requests wait for the third, then all three run
    as one pass at once (no run left to wait for); a server with one run does not wait at all."""
    from tinkerbell.engine import gather

    monkeypatch.setattr(gather, "QUIET_SECONDS", 5.0)
    monkeypatch.setattr(gather, "MAX_SECONDS", 10.0)
    eng = Engine(EngineConfig(model=str(tiny_llama_dir), max_loras=2, max_lora_rank=8))
    try:
        eng.create_adapter("only", LoraSpec(rank=4), seed=0).result()
        assert eng.forward_backward("only", [_datum(1)], "cross_entropy", {}, False).result(timeout=4)
        for run in ("u2", "u3"):
            eng.create_adapter(run, LoraSpec(rank=4), seed=0).result()
        batches = eng.stats()["train_batches"]
        futs = [eng.forward_backward(run, [_datum(i)], "cross_entropy", {}, False)
                for i, run in enumerate(("only", "u2"))]
        time.sleep(0.5)  # without gathering, time enough to run them (ms on this model)
        assert not any(f.done() for f in futs)  # waiting for the third run (the engine thread sleeps meanwhile)
        futs.append(eng.forward_backward("u3", [_datum(5)], "cross_entropy", {}, False))
        assert all(f.result(timeout=4).metrics["loss:sum"] > 0 for f in futs)
        assert eng.stats()["train_batches"] == batches + 1
    finally:
        eng.shutdown()
