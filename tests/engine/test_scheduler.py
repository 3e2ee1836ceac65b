"""Continuous batching on a real tiny model: preemption by recompute, chunked prefill beside running decodes,
prefix caching, shared prompt blocks of num_samples, LoRA slot eviction and waiting."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tinkerbell.engine.types import SampleJob
from tests.engine.test_sampler import (PROMPTS, _hf, drain, greedy, hf_logprobs, make_sampler, nonzero_adapter, run,
                                      submit)


def _tokens(results) -> list[list[list[int]]]:
    return [[s.tokens for s in r.sequences] for r in results]


def _long_jobs() -> list[SampleJob]:
    g = torch.Generator().manual_seed(3)
    jobs = []
    for i in range(5):
        prompt = torch.randint(0, 300, (9 + 3 * i,), generator=g).tolist()
        jobs.append(SampleJob(prompt=prompt, max_tokens=24, temperature=0.0 if i % 2 else 1.0, seed=i,
                              stop_at_eos=False, num_samples=2 if i == 2 else 1))
    return jobs


def test_preemption_gives_the_same_tokens_as_a_large_cache(tiny_llama_dir):
    big = make_sampler(tiny_llama_dir, num_blocks=256)
    ref = run(big, _long_jobs())
    assert big.stats()["preemptions"] == 0
    # 12 blocks of 4 tokens: one request needs up to 10, so five (six sequences) cannot run together.
    small = make_sampler(tiny_llama_dir, num_blocks=12)
    got = run(small, _long_jobs())
    st = small.stats()
    assert st["preemptions"] > 0
    assert _tokens(got) == _tokens(ref)
    for a, b in zip(got, ref):
        for sa, sb in zip(a.sequences, b.sequences):
            assert torch.allclose(torch.tensor(sa.logprobs), torch.tensor(sb.logprobs), atol=1e-4)
    assert st["kv_blocks_used"] == 0 and st["requests_finished"] == 5


def test_chunked_prefill_matches_and_decode_keeps_running(tiny_llama_dir):
    long_prompt = (PROMPTS[3] * 3)[:60]
    jobs = [greedy(PROMPTS[0], 20, stop_at_eos=False),
            SampleJob(prompt=long_prompt, max_tokens=6, prompt_logprobs=True, seed=1, stop_at_eos=False)]
    ref = run(make_sampler(tiny_llama_dir), jobs)

    sampler = make_sampler(tiny_llama_dir, max_batch_tokens=8)
    short = submit(sampler, jobs[0])
    sampler.step()  # prefill of the short prompt (5 tokens) + its first token
    long = submit(sampler, jobs[1])
    seq = sampler.scheduler.running[0]
    prefill_steps = 0
    while not sampler.scheduler.running[-1].group.prefilled or len(sampler.scheduler.running) < 2:
        before = len(seq.tokens)
        sampler.step()
        assert len(seq.tokens) == before + 1  # the decode advanced during the long prefill
        prefill_steps += 1
    assert prefill_steps >= 60 // 7  # 7 tokens of prefill per step beside one decode token
    drain(sampler)
    got = [short.result(timeout=0), long.result(timeout=0)]
    assert _tokens(got) == _tokens(ref)
    assert torch.allclose(torch.tensor(got[1].prompt_logprobs[1:]), torch.tensor(ref[1].prompt_logprobs[1:]),
                          atol=1e-4)


def test_prefix_cache_hit_and_adapter_salt(tiny_llama_dir):
    sampler = make_sampler(tiny_llama_dir, block_size=4)
    prompt = PROMPTS[3]  # 23 tokens: 5 full blocks
    first = run(sampler, [greedy(prompt, 8)])[0]
    assert first.prompt_cache_hit_tokens == 0
    assert sampler.stats()["kv_blocks_cached"] >= 5
    second = run(sampler, [greedy(prompt, 8)])[0]
    assert second.prompt_cache_hit_tokens == 20
    assert second.sequences[0].tokens == first.sequences[0].tokens
    # A prompt that extends the first one's prompt + output reuses those blocks too (generated blocks cache).
    longer = prompt + first.sequences[0].tokens + [7, 7]
    third = run(sampler, [greedy(longer, 4)])[0]
    assert third.prompt_cache_hit_tokens == 28
    assert third.sequences[0].tokens == run(make_sampler(tiny_llama_dir), [greedy(longer, 4)])[0].sequences[0].tokens
    # Under an adapter the same tokens have other K/V: no hit.
    sampler.register_adapter("a", nonzero_adapter(tiny_llama_dir, rank=2, seed=0))
    assert run(sampler, [greedy(prompt, 2, adapter_key="a")])[0].prompt_cache_hit_tokens == 0
    assert run(sampler, [greedy(prompt, 2, adapter_key="a")])[0].prompt_cache_hit_tokens == 20
    # Re-registering the key changes its weights, so the old blocks must not match.
    sampler.register_adapter("a", nonzero_adapter(tiny_llama_dir, rank=2, seed=1))
    assert run(sampler, [greedy(prompt, 2, adapter_key="a")])[0].prompt_cache_hit_tokens == 0


def test_num_samples_share_the_prompt_blocks(tiny_llama_dir):
    sampler = make_sampler(tiny_llama_dir, block_size=4)
    prompt = PROMPTS[1][:10]  # 2 full blocks + a partial one of 2 tokens
    fut = submit(sampler, SampleJob(prompt=prompt, num_samples=4, max_tokens=3, seed=0, stop_at_eos=False))
    sampler.step()  # prefill once, fork into 4 samples
    st = sampler.stats()
    assert st["running_seqs"] == 4 and st["kv_blocks_used"] == 3 and st["tokens_computed"] == 10
    sampler.step()  # each sample writes its first token: copy-on-write of the partial block only
    st = sampler.stats()
    assert st["kv_blocks_used"] == 2 + 4  # not 4 * 3
    assert st["tokens_computed"] == 10 + 4
    drain(sampler)
    res = fut.result(timeout=0)
    assert len(res.sequences) == 4 and all(len(s.tokens) == 3 for s in res.sequences)
    assert len({tuple(s.tokens) for s in res.sequences}) > 1
    # Every sample's logprobs equal HF's on its own full sequence: copy-on-write kept their K/V apart.
    for seq in res.sequences:
        ref = hf_logprobs(_hf(tiny_llama_dir), prompt + seq.tokens)[len(prompt) - 1:]
        assert torch.allclose(torch.tensor(seq.logprobs), ref, atol=1e-4)
    assert sampler.stats()["kv_blocks_used"] == 0


def test_more_adapters_than_slots(tiny_llama_dir):
    path = tiny_llama_dir
    adapters = {f"a{i}": nonzero_adapter(path, rank=2 + i, seed=i) for i in range(3)}
    roomy = make_sampler(path, max_loras=4)
    for k, w in adapters.items():
        roomy.register_adapter(k, w)
    jobs = [greedy(p, 8, adapter_key=k) for p in PROMPTS[:2] for k in [*adapters, None]]
    ref = run(roomy, jobs)

    tight = make_sampler(path, max_loras=1)
    for k, w in adapters.items():
        tight.register_adapter(k, w)
    futs = [submit(tight, j) for j in jobs]
    tight.step()
    st = tight.stats()
    # One slot: only a0's requests and the base requests can run; the rest wait rather than fail.
    assert st["running_seqs"] == 4 and st["waiting_seqs"] == 4 and st["lora_slots_resident"] == ["a0"]
    drain(tight)
    assert _tokens([f.result(timeout=0) for f in futs]) == _tokens(ref)
    assert tight.stats()["lora_loads"] >= 3


def test_running_request_keeps_weights_when_key_is_replaced(tiny_llama_dir):
    path = tiny_llama_dir
    old, new = nonzero_adapter(path, rank=2, seed=1), nonzero_adapter(path, rank=2, seed=2)
    ref = {}
    for name, w in (("old", old), ("new", new)):
        s = make_sampler(path)
        s.register_adapter("k", w)
        ref[name] = run(s, [greedy(PROMPTS[0], 10, adapter_key="k", stop_at_eos=False)])[0].sequences[0].tokens
    sampler = make_sampler(path, max_loras=2)
    sampler.register_adapter("k", old)
    first = submit(sampler, greedy(PROMPTS[0], 10, adapter_key="k", stop_at_eos=False))
    sampler.step()
    sampler.register_adapter("k", new)
    second = submit(sampler, greedy(PROMPTS[0], 10, adapter_key="k", stop_at_eos=False))
    drain(sampler)
    assert first.result(timeout=0).sequences[0].tokens == ref["old"]
    assert second.result(timeout=0).sequences[0].tokens == ref["new"]
    assert sampler.stats()["lora_slots_resident"] == ["k"]


def _mixed_jobs(seed: int) -> list[SampleJob]:
    """Random requests: shared prefixes, adapters, num_samples, filters, stops, prompt logprobs."""
    r = random.Random(seed)
    out: list[SampleJob] = []
    for _ in range(14):
        prompt = [r.randrange(300) for _ in range(r.randrange(1, 40))]
        if out and r.random() < 0.3:
            prev = out[-1].prompt
            prompt = prev[:r.randrange(1, len(prev) + 1)] + prompt[:5]
        out.append(SampleJob(
            prompt=prompt, max_tokens=r.randrange(1, 30), num_samples=r.choice([1, 1, 2, 3]),
            temperature=r.choice([0.0, 1.0, 0.8]), top_k=r.choice([-1, 5]), top_p=r.choice([1.0, 0.9]),
            seed=r.randrange(100), adapter_key=r.choice([None, "a0", "a1", "a2"]),
            prompt_logprobs=r.random() < 0.3, prompt_logprobs_last_n=r.choice([None, 3]),
            topk_sample_logprobs=r.choice([0, 2]), stop_token_ids=[r.randrange(300)],
            stop_strings=r.choice([[], ["e"]])))
    return out


def _run_mixed(sampler, adapters, jobs: list[SampleJob], per_step: int) -> tuple[list, list[float]]:
    """Submit `per_step` requests before each step (0: all at once). Returns the tokens and stop reasons
    (compared exactly) and every logprob returned, flattened (compared with a tolerance)."""
    for k, w in adapters.items():
        sampler.register_adapter(k, w)
    futs, pending = [], list(jobs)
    while pending or sampler.has_work():
        for _ in range(per_step or len(pending)):
            if pending:
                futs.append(submit(sampler, pending.pop(0)))
        if sampler.has_work():
            sampler.step()
    assert sampler.stats()["kv_blocks_used"] == 0
    exact, lps = [], []
    for f in futs:
        res = f.result(timeout=0)
        exact.append(([(s.tokens, s.stop_reason) for s in res.sequences],
                      [math.isnan(x) for x in res.prompt_logprobs or []]))
        lps += [x for x in res.prompt_logprobs or [] if not math.isnan(x)]
        lps += [x for s in res.sequences for x in s.logprobs]
    return exact, lps


@pytest.mark.parametrize("seed", [0, 4])
def test_mixed_load_matches_under_any_cache_budget_and_slot_count(tiny_llama_dir, seed):
    adapters = {f"a{i}": nonzero_adapter(tiny_llama_dir, rank=2 + i, seed=i) for i in range(3)}
    ref = _run_mixed(make_sampler(tiny_llama_dir, max_loras=4), adapters, _mixed_jobs(seed), 0)
    for kw, per_step in [(dict(max_loras=1, num_blocks=18, max_batch_tokens=16), 2),
                         (dict(max_loras=2, num_blocks=36, block_size=2, max_batch_tokens=7), 1),
                         (dict(max_loras=2, num_blocks=10, block_size=8, max_batch_tokens=64), 3)]:
        sampler = make_sampler(tiny_llama_dir, **kw)
        exact, lps = _run_mixed(sampler, adapters, _mixed_jobs(seed), per_step)
        assert exact == ref[0], kw
        assert torch.allclose(torch.tensor(lps), torch.tensor(ref[1]), atol=1e-4), kw
        assert sampler.stats()["preemptions"] > 0
