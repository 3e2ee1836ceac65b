"""DiffusionSampler batching: heterogeneous requests share forwards yet each gets exactly the tokens it gets
alone; rows end independently, new requests join mid-flight, stop tokens end a row, blocks stream; and the
engine serves LLaDA through it (training refused with a user error)."""

from concurrent.futures import Future

import pytest
import torch

from tinkerbell.engine.diffusion import DiffusionSampler
from tinkerbell.engine.models.loader import load_model
from tinkerbell.engine.types import EngineUserError, SampleJob


@pytest.fixture(scope="module")
def model(tiny_llada_dir):
    return load_model(tiny_llada_dir, torch.float32, "cpu")


def make_sampler(model, **kw):
    return DiffusionSampler(model, torch.device("cpu"), torch.float32, eos_token_ids=[], decode=lambda ids: "",
                            max_context=512, **kw)


def submit(sampler, job):
    fut = Future()
    sampler.add_request(job, fut)
    return fut


def drain(sampler):
    while sampler.has_work():
        sampler.step()


JOBS = [
    SampleJob(prompt=[10, 11, 12], max_tokens=8, temperature=0.0, steps=8, block_length=4),
    SampleJob(prompt=[40, 41, 42, 43, 44, 45, 46], max_tokens=12, temperature=0.0, steps=6, block_length=4,
              generation_algorithm="prefix_cache"),
    SampleJob(prompt=[99] * 11, max_tokens=6, temperature=0.0, steps=6, block_length=6, cfg_scale=2.0,
              generation_algorithm="dual_cache"),
    SampleJob(prompt=[7, 8], max_tokens=10, temperature=0.0, block_length=5, threshold=0.05),
    SampleJob(prompt=[60, 61, 62, 63], max_tokens=9, temperature=0.8, seed=123, steps=9, block_length=3,
              num_samples=2, remasking="random"),
    # threshold and factor rows commit a count known only on the device: read for all rows in one sync a step
    SampleJob(prompt=[70, 71, 72], max_tokens=8, temperature=0.0, block_length=4, factor=1.0),
]


def test_heterogeneous_batch_equals_each_request_alone(model):
    alone = []
    for job in JOBS:
        s = make_sampler(model)
        fut = submit(s, job)
        drain(s)
        alone.append([q.tokens for q in fut.result().sequences])
    batched = make_sampler(model, batch_size=16)
    futs = [submit(batched, job) for job in JOBS]
    drain(batched)
    assert [[q.tokens for q in f.result().sequences] for f in futs] == alone
    stats = batched.stats()
    assert stats["batches_run"] > 0 and stats["mean_batch_size"] > 2 and stats["pending_requests"] == 0
    assert max(int(k) for k in stats["batch_size_histogram"]) == 7  # 5 one-row requests + 2 samples of one
    # Seeded sampling: same seed, same tokens; the two samples of one request differ.
    assert alone[4][0] != alone[4][1]


def test_rows_end_independently_and_new_requests_join(model):
    s = make_sampler(model, batch_size=2)
    short = submit(s, JOBS[0])
    long = submit(s, SampleJob(prompt=[20, 21], max_tokens=16, temperature=0.0, steps=16, block_length=4))
    late, done_at = None, {}
    for i in range(40):
        if not s.has_work():
            break
        s.step()
        if i == 3:
            late = submit(s, JOBS[3])  # waits for a free row (batch_size 2), then joins while `long` runs
        for name, f in (("short", short), ("long", long), ("late", late)):
            if f is not None and f.done():
                done_at.setdefault(name, i)
    assert done_at["short"] == 7 < done_at["late"] and done_at["short"] < done_at["long"] == 15
    solo = make_sampler(model)
    again = submit(solo, JOBS[3])
    drain(solo)
    assert late.result().sequences[0].tokens == again.result().sequences[0].tokens
    assert s.stats()["batch_size_histogram"].get("2", 0) > 0


def test_stop_token_ends_a_row_and_blocks_stream(model):
    base = dict(prompt=[30, 31, 32], max_tokens=12, temperature=0.0, steps=12, block_length=4)
    s = make_sampler(model)
    full = submit(s, SampleJob(**base))
    drain(s)
    tokens = full.result().sequences[0].tokens
    stop = tokens[5]
    cut = tokens.index(stop)
    streamed = []
    job = SampleJob(**base, stop_token_ids=[stop], on_block=lambda i, toks, fin: streamed.append((i, toks, fin)))
    fut = submit(s, job)
    drain(s)
    seq = fut.result().sequences[0]
    assert seq.tokens == tokens[:cut + 1] and seq.stop_reason == "stop" and len(seq.logprobs) == cut + 1
    assert [t for _, toks, _ in streamed for t in toks] == seq.tokens
    assert streamed[-1][2] and not any(fin for _, _, fin in streamed[:-1])
    assert len(streamed) == cut // 4 + 1  # one callback per finished block, none after the stop


def test_max_tokens_not_a_multiple_of_block_length(model):
    s = make_sampler(model)
    fut = submit(s, SampleJob(prompt=[10, 20], max_tokens=7, temperature=0.0, steps=5, block_length=3))
    drain(s)
    seq = fut.result().sequences[0]
    assert len(seq.tokens) == 7 and model.cfg.mask_token_id not in seq.tokens


def test_cancelled_request_leaves_and_fail_all_resolves(model):
    s = make_sampler(model)
    a = submit(s, JOBS[0])
    b = submit(s, JOBS[1])
    s.step()
    a.cancel()
    drain(s)
    assert b.result().sequences[0].tokens
    c = submit(s, JOBS[0])
    s.fail_all(RuntimeError("boom"))
    assert not s.has_work() and isinstance(c.exception(), RuntimeError)


def test_engine_serves_llada_and_refuses_training(tiny_llada_dir):
    from tinkerbell.engine.engine import Engine, EngineConfig
    from tinkerbell.engine.lora import LoraSpec

    engine = Engine(EngineConfig(model=str(tiny_llada_dir), device="cpu", algorithm="dual_cache", batch_size=4))
    try:
        res = engine.sample(SampleJob(prompt=[10, 11, 12], max_tokens=8, temperature=0.0, steps=4,
                                      block_length=4)).result(timeout=60)
        assert len(res.sequences[0].tokens) <= 8
        with pytest.raises(EngineUserError, match="unknown algorithm"):
            engine.sample(SampleJob(prompt=[10], max_tokens=4, generation_algorithm="warp")).result(timeout=60)
        with pytest.raises(EngineUserError, match="training is not supported"):
            engine.create_adapter("run", LoraSpec(rank=4), seed=0).result(timeout=60)
        stats = engine.stats()["sampler"]
        assert stats["algorithm"] == "dual_cache" and stats["max_batch_size"] == 4
    finally:
        engine.shutdown()


def test_an_idle_sampler_gathers_a_burst_into_one_batch(model, monkeypatch):
    """Requests arriving within gather.QUIET_SECONDS of each other start together (in phase), a lone request
    starts once that quiet time has passed, and a stream that never pauses starts after gather.MAX_SECONDS."""
    from tinkerbell.engine import diffusion, gather

    clock = [100.0]
    monkeypatch.setattr(diffusion, "_clock", lambda: clock[0])
    monkeypatch.setattr(diffusion, "_sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    quiet, most = gather.QUIET_SECONDS, gather.MAX_SECONDS
    s = make_sampler(model, batch_size=8)
    job = SampleJob(prompt=[10, 11, 12], max_tokens=4, temperature=0.0, steps=4, block_length=4)
    futs = [submit(s, job)]
    s.step()  # sleeps (on the fake clock) instead of running a forward
    assert s.stats()["steps"] == 0
    clock[0] += quiet / 3
    futs.append(submit(s, job))  # within the quiet time: joins the same first batch
    while s.stats()["steps"] == 0:
        s.step()
    assert s.stats()["batch_size_histogram"] == {"2": 1}
    drain(s)
    assert clock[0] - 100.0 < quiet + quiet / 3 + 0.006  # a lone burst waits only for its quiet time

    s = make_sampler(model, batch_size=64)
    start = clock[0]
    while s.stats()["steps"] == 0:  # a request every quiet / 2: never quiet
        submit(s, job)
        clock[0] += quiet / 2
        s.step()
    assert most <= clock[0] - start < most + 0.01


def _row_bytes(model, job):
    from tinkerbell.engine.diffusion_memory import DiffusionMemory

    mem = DiffusionMemory.for_model(model.cfg, torch.float32, None)
    return mem.row_bytes(len(job.prompt) + job.max_tokens, job.generation_algorithm or "basic", job.cfg_scale)


def test_rows_beyond_the_memory_budget_wait_and_get_their_own_tokens(model):
    job = SampleJob(prompt=[10, 11, 12], max_tokens=8, temperature=0.0, steps=8, block_length=4,
                    generation_algorithm="dual_cache")
    s = make_sampler(model, memory_bytes=2 * _row_bytes(model, job))
    futs = [submit(s, job) for _ in range(5)]
    peak = 0
    while s.has_work():
        s.step()
        peak = max(peak, s.stats()["memory_held_bytes"])
    assert max(int(k) for k in s.stats()["batch_size_histogram"]) == 2
    assert peak <= s.stats()["memory_budget_bytes"]
    alone = make_sampler(model)
    want = submit(alone, job)
    drain(alone)
    assert all(f.result().sequences[0].tokens == want.result().sequences[0].tokens for f in futs)


def test_a_request_that_could_never_fit_the_memory_budget_is_refused_naming_it(model):
    cached = SampleJob(prompt=[10, 11, 12], max_tokens=8, temperature=0.0, generation_algorithm="dual_cache")
    basic = SampleJob(prompt=[10, 11, 12], max_tokens=8, temperature=0.0, generation_algorithm="basic")
    s = make_sampler(model, memory_bytes=_row_bytes(model, cached) - 1)
    with pytest.raises(EngineUserError, match=r"max_tokens: prompt \+ max_tokens = 11 tokens with "
                                              r"generation_algorithm dual_cache need .* GiB of GPU memory; this "
                                              r"server's diffusion budget is .* use generation_algorithm basic"):
        submit(s, cached)
    submit(s, basic)  # a third of the memory: fits
    drain(s)


def test_llada_8b_row_costs_are_what_the_module_says():
    """diffusion_memory's docstring: 1.7 MB a token cached, 0.6 MB with basic (LLaDA-8B, bf16)."""
    from bench.diffusion_speed import LLADA_8B
    from tinkerbell.engine.diffusion_memory import DiffusionMemory
    from tinkerbell.engine.models.config import ModelConfig

    mem = DiffusionMemory.for_model(ModelConfig.from_hf_dict(LLADA_8B), torch.bfloat16, None)
    assert round(mem.row_bytes(1, "dual_cache", 0) / 1e6, 1) == 1.7
    assert round(mem.row_bytes(1, "basic", 0) / 1e6, 1) == 0.6
    assert mem.row_bytes(1, "basic", 2.0) == 2 * mem.row_bytes(1, "basic", 0)
