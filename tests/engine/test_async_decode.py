"""Asynchronous decode (sampler_async.py) on the CPU, forced on with the fast path and the runner's CPU graph
emulation: the same tokens, logprobs, stop reasons and streamed tokens as the synchronous path for batches
whose sequences stop at different steps (stop token, stop string, max_tokens), with num_samples > 1,
seeded and filtered draws, cancellation mid-run and preemption; and step n+1 really is launched before
step n's tokens are read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinkerbell.engine.kernels.gumbel_sample import row_keys
from tinkerbell.engine.types import SampleJob, SampleResult
from tests.engine.test_sampler import PROMPTS, _tokenizer, drain, make_sampler, nonzero_adapter, run, submit
from tests.engine.test_scheduler import _mixed_jobs


def _sampler(path, async_decode: bool, **kw):
    kw.setdefault("cuda_graphs", True)
    kw.setdefault("max_context", 96)  # the CPU's emulated graph attends over the whole context: keep it short
    return make_sampler(path, fast=True, async_decode=async_decode, **kw)


def _same(got: list[SampleResult], ref: list[SampleResult]) -> None:
    for g, r in zip(got, ref, strict=True):
        assert [(s.tokens, s.stop_reason) for s in g.sequences] == [(s.tokens, s.stop_reason) for s in r.sequences]
        for gs, rs in zip(g.sequences, r.sequences):
            assert np.allclose(gs.logprobs, rs.logprobs, atol=1e-4)  # batches differ: float sums do too
            assert (gs.topk_ids is None) == (rs.topk_ids is None)
            if rs.topk_ids is not None:
                assert np.array_equal(gs.topk_ids, rs.topk_ids) and gs.topk_ids.dtype == rs.topk_ids.dtype
                assert np.allclose(gs.topk_logprobs, rs.topk_logprobs, atol=1e-4)


def _first_new(tokens: list[int], after: int) -> int:
    return next(t for i, t in enumerate(tokens) if i >= after and t not in tokens[:i])


def _stopping_jobs(path) -> tuple[list[SampleJob], list[int]]:
    """Requests that end at different steps, each for a different reason (a stop token, a stop string, EOS,
    max_tokens), and the EOS id for the sampler; the stop token, string and EOS are taken from an unstopped
    greedy run so they really fire mid-way."""
    free = run(_sampler(path, False, eos=[]), [SampleJob(prompt=p, max_tokens=24, temperature=0.0)
                                                for p in PROMPTS[:3]])
    toks0, toks1, toks2 = (f.sequences[0].tokens for f in free)
    stop_tok = _first_new(toks0, 4)
    eos = _first_new(toks2, 6)
    text = _tokenizer(path).decode(toks1[:9], skip_special_tokens=False)
    stop_str = text[-2:] if text[-2:] not in _tokenizer(path).decode(toks1[:7]) else text[-1]
    return [
        SampleJob(prompt=PROMPTS[0], max_tokens=24, temperature=0.0, stop_token_ids=[stop_tok], stop_at_eos=False),
        SampleJob(prompt=PROMPTS[1], max_tokens=24, temperature=0.0, stop_strings=[stop_str], stop_at_eos=False),
        SampleJob(prompt=PROMPTS[2], max_tokens=6, temperature=0.0, stop_at_eos=False),
        SampleJob(prompt=PROMPTS[3], max_tokens=1, temperature=0.0, stop_at_eos=False),
        SampleJob(prompt=PROMPTS[0], max_tokens=11, temperature=1.0, seed=5, num_samples=3, top_p=0.9,
                  stop_at_eos=False),
        SampleJob(prompt=PROMPTS[1], max_tokens=17, temperature=0.8, seed=6, stop_at_eos=False),
        SampleJob(prompt=PROMPTS[3], max_tokens=9, temperature=0.0, topk_sample_logprobs=3, stop_at_eos=False),
        SampleJob(prompt=PROMPTS[2], max_tokens=24, temperature=0.0),  # ends at EOS
    ], [eos]


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_async_equals_sync_when_sequences_stop_at_different_steps(tiny_llama_dir, cuda_graphs):
    jobs, eos = _stopping_jobs(tiny_llama_dir)
    ref = run(_sampler(tiny_llama_dir, False, eos=eos, cuda_graphs=cuda_graphs), jobs)
    lengths = [len(s.tokens) for r in ref for s in r.sequences]
    reasons = [r.sequences[0].stop_reason for r in ref]
    assert reasons[:3] == ["stop", "stop", "length"]
    assert reasons[-1] == "stop" and ref[-1].sequences[0].tokens[-1] == eos[0]
    assert len(set(lengths)) >= 5  # the batch really shrinks step by step
    sampler = _sampler(tiny_llama_dir, True, eos=eos, cuda_graphs=cuda_graphs)
    got = run(sampler, jobs)
    _same(got, ref)
    st = sampler.stats()
    assert st["kv_blocks_used"] == 0 and st["running_seqs"] == 0
    assert st["tokens_generated"] == sum(lengths)  # discarded tokens are never counted
    assert sampler._async.launched >= 15  # the steady state ran asynchronously


def test_streamed_tokens_are_the_kept_ones(tiny_llama_dir):
    jobs, eos = _stopping_jobs(tiny_llama_dir)
    streams = {}
    for mode in (False, True):
        seen: list[tuple[int, int, int, float]] = []
        for j, job in enumerate(jobs):
            job.on_token = lambda i, t, lp, j=j: seen.append((j, i, t, lp))
        results = run(_sampler(tiny_llama_dir, mode, eos=eos), jobs)
        for j, res in enumerate(results):  # per request and sample: exactly the result's tokens, in order
            for i, seq in enumerate(res.sequences):
                assert [t for (jj, ii, t, _) in seen if (jj, ii) == (j, i)] == seq.tokens
        streams[mode] = sorted((j, i, t) for j, i, t, _ in seen)
    assert streams[True] == streams[False]


def test_step_n_plus_1_is_launched_before_step_n_is_read(tiny_llama_dir):
    events: list[str] = []
    sampler = _sampler(tiny_llama_dir, True, eos=[])
    forward, forward_sampled = sampler.execute, sampler.execute_sampled
    sampler.execute = lambda plan, copies: (events.append("forward"), forward(plan, copies))[1]

    def sampled(plan, copies):
        out = forward_sampled(plan, copies)
        if out is not None:
            events.append("forward")
        return out

    sampler.execute_sampled = sampled
    job = SampleJob(prompt=PROMPTS[0], max_tokens=10, temperature=0.0, stop_at_eos=False,
                    on_token=lambda i, t, lp: events.append("token"))
    run(sampler, [job])
    # Forwards seen when each token is read: the prefill's token synchronously (1), then every decode's
    # token only after the next decode was launched (k + 2), except the last one, which nothing follows.
    seen, forwards = [], 0
    for e in events:
        forwards += e == "forward"
        if e == "token":
            seen.append(forwards)
    assert seen == [1] + [k + 2 for k in range(1, 9)] + [10]


def test_cancel_mid_run_frees_everything_and_leaves_the_others_unchanged(tiny_llama_dir):
    jobs = [SampleJob(prompt=p, max_tokens=20, temperature=0.0, stop_at_eos=False) for p in PROMPTS]
    ref = run(_sampler(tiny_llama_dir, False), [jobs[0], jobs[2], jobs[3]])
    sampler = _sampler(tiny_llama_dir, True)
    futs = [submit(sampler, j) for j in jobs]
    for _ in range(6):
        sampler.step()
    assert sampler._async.inflight is not None  # cancelled while one of its steps is in flight
    futs[1].cancel()
    drain(sampler)
    _same([f.result(timeout=0) for f in (futs[0], futs[2], futs[3])], ref)
    st = sampler.stats()
    assert st["kv_blocks_used"] == 0 and st["running_seqs"] == 0 and not sampler.has_work()


def test_fail_all_with_a_step_in_flight_leaves_a_clean_sampler(tiny_llama_dir):
    sampler = _sampler(tiny_llama_dir, True)
    futs = [submit(sampler, SampleJob(prompt=p, max_tokens=30, stop_at_eos=False)) for p in PROMPTS]
    for _ in range(4):
        sampler.step()
    assert sampler._async.inflight is not None
    sampler.fail_all(RuntimeError("boom"))
    for f in futs:
        with pytest.raises(RuntimeError, match="boom"):
            f.result(timeout=0)
    assert not sampler.has_work() and sampler.stats()["kv_blocks_used"] == 0
    job = SampleJob(prompt=PROMPTS[1], max_tokens=8, temperature=0.0, stop_at_eos=False)
    _same(run(sampler, [job]), run(_sampler(tiny_llama_dir, False), [job]))


def test_preemption_under_a_small_cache_gives_the_sync_tokens(tiny_llama_dir):
    g = torch.Generator().manual_seed(3)
    jobs = [SampleJob(prompt=torch.randint(0, 300, (9 + 3 * i,), generator=g).tolist(), max_tokens=24,
                      temperature=0.0 if i % 2 else 1.0, seed=i, stop_at_eos=False, num_samples=2 if i == 2 else 1)
            for i in range(5)]
    ref = run(_sampler(tiny_llama_dir, False, num_blocks=256), jobs)
    sampler = _sampler(tiny_llama_dir, True, num_blocks=12)  # 12 blocks of 4 tokens: not all fit at once
    got = run(sampler, jobs)
    _same(got, ref)
    st = sampler.stats()
    assert st["preemptions"] > 0 and st["kv_blocks_used"] == 0 and sampler._async.launched > 0


def _staggered(sampler, adapters: dict, jobs: list[SampleJob], per_step: int) -> list[SampleResult]:
    """`per_step` new requests before each step."""
    for k, w in adapters.items():
        sampler.register_adapter(k, w)
    futs, pending = [], list(jobs)
    while pending or sampler.has_work():
        for _ in range(per_step):
            if pending:
                futs.append(submit(sampler, pending.pop(0)))
        if sampler.has_work():
            sampler.step()
    assert sampler.stats()["kv_blocks_used"] == 0
    return [f.result(timeout=0) for f in futs]


@pytest.mark.parametrize("kw, per_step", [(dict(max_loras=4), 2),
                                          (dict(max_loras=1, num_blocks=18, max_batch_tokens=16), 1)])
def test_requests_arriving_while_a_step_is_in_flight(tiny_llama_dir, kw, per_step):
    """Staggered arrivals of mixed requests (adapters, num_samples, filters, stop tokens and strings, prompt
    and top-k logprobs): admitted and prefilled beside the decode step in flight, then joining it; with a
    small cache and one LoRA slot too (preemption, requests waiting for the slot)."""
    adapters = {f"a{i}": nonzero_adapter(tiny_llama_dir, rank=2 + i, seed=i) for i in range(3)}
    ref = _staggered(_sampler(tiny_llama_dir, False, **kw), adapters, _mixed_jobs(4), per_step)
    sampler = _sampler(tiny_llama_dir, True, **kw)
    got = _staggered(sampler, adapters, _mixed_jobs(4), per_step)
    _same(got, ref)
    for g, r in zip(got, ref):
        gp, rp = (np.array(x.prompt_logprobs or [], dtype=float) for x in (g, r))
        assert np.allclose(gp, rp, atol=1e-4, equal_nan=True)
    assert any(s.topk_ids is not None for r in ref for s in r.sequences)
    a = sampler._async
    assert a.launched > 10 and a.joined > 0 and a.side_steps > 0


def test_host_noise_keys_equal_the_torch_form():
    rng = np.random.default_rng(0)
    seeds = rng.integers(0, 2**63 - 1, 500, dtype=np.int64)
    pos = rng.integers(0, 2**31, 500, dtype=np.int64)
    assert np.array_equal(row_keys(seeds, pos), row_keys(torch.from_numpy(seeds), torch.from_numpy(pos)).numpy())


def test_sequences_reaching_the_context_limit(tiny_llama_dir):
    # 48 tokens of context in blocks of 4: the block-table mirror grows to the runner's full table width.
    jobs = [SampleJob(prompt=PROMPTS[3], max_tokens=25, temperature=0.0, stop_at_eos=False),
            SampleJob(prompt=PROMPTS[0], max_tokens=43, temperature=1.0, seed=2, stop_at_eos=False)]
    ref = run(_sampler(tiny_llama_dir, False, max_context=48), jobs)
    sampler = _sampler(tiny_llama_dir, True, max_context=48)
    _same(run(sampler, jobs), ref)
    assert [len(r.sequences[0].tokens) for r in ref] == [25, 43] and sampler._async.launched > 20


def test_plain_draws_are_sampled_inside_the_graph_and_filtered_ones_outside(tiny_llama_dir):
    def graph_sampled(job: SampleJob) -> int:
        sampler = _sampler(tiny_llama_dir, True, eos=[])
        calls = []
        sample_decode = sampler.runner.sample_decode
        sampler.runner.sample_decode = lambda plan: (calls.append(len(plan.rows)), sample_decode(plan))[1]
        ref = run(_sampler(tiny_llama_dir, False, eos=[]), [job])
        _same(run(sampler, [job]), ref)
        return len(calls)

    plain = SampleJob(prompt=PROMPTS[0], max_tokens=12, temperature=0.9, seed=3, num_samples=2, stop_at_eos=False)
    assert graph_sampled(plain) >= 8
    filtered = SampleJob(prompt=PROMPTS[0], max_tokens=12, temperature=0.9, seed=3, top_k=5, stop_at_eos=False)
    assert graph_sampled(filtered) == 0
