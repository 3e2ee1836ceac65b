"""The sampler's fast path (runner.py, batched sampling) equals the reference path on the CPU: greedy tokens,
logprobs, adapters, prompt logprobs; its seeded draws are reproducible and batch-independent and follow the
filtered distribution. CUDA graphs and the Triton kernels run on the GPU in bench/sampling_speed.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinkerbell.engine import sampling
from tinkerbell.engine.sampling import SamplingParams
from tinkerbell.engine.types import SampleJob
from tests.engine.test_sampler import PROMPTS, greedy, make_sampler, nonzero_adapter, run


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen3_dir", "tiny_qwen2_dir"])
def test_fast_greedy_and_logprobs_equal_reference(fixture, request):
    path = request.getfixturevalue(fixture)
    adapters = {"one": nonzero_adapter(path, rank=4, seed=1), "two": nonzero_adapter(path, rank=8, seed=2,
                                                                                       train_attn=False)}
    jobs = [SampleJob(prompt=p, max_tokens=10, temperature=0.0, adapter_key=k, prompt_logprobs=True,
                      topk_sample_logprobs=3, stop_at_eos=False)
            for p in PROMPTS for k in ("one", None, "two")]
    results = {}
    # "graphs" on the CPU: decode steps through the runner's static buffers (padding, tables, LoRA tiles).
    for mode in ("reference", "fast", "graphs"):
        sampler = make_sampler(path, fast=mode != "reference", cuda_graphs=mode == "graphs",
                               max_batch_tokens=24)  # small budget: prefill chunks mix with decodes
        for key, w in adapters.items():
            sampler.register_adapter(key, w)
        results[mode] = run(sampler, jobs)
        if mode == "graphs":
            assert sampler.runner.graph_steps > 0 and sampler.runner.eager_steps > 0
    for ref, got in [*zip(results["reference"], results["fast"]), *zip(results["reference"], results["graphs"])]:
        r, g = ref.sequences[0], got.sequences[0]
        assert g.tokens == r.tokens
        assert np.allclose(g.logprobs, r.logprobs, atol=1e-4)
        assert np.array_equal(g.topk_ids, r.topk_ids) and np.allclose(g.topk_logprobs, r.topk_logprobs, atol=1e-4)
        assert np.allclose(got.prompt_logprobs[1:], ref.prompt_logprobs[1:], atol=1e-4)


def test_fast_seeded_draws_reproduce_alone_batched_and_filtered(tiny_llama_dir):
    path = tiny_llama_dir
    job = lambda seed, **kw: SampleJob(prompt=PROMPTS[0], max_tokens=12, seed=seed,  # noqa: E731
                                       stop_at_eos=False, **kw)
    alone = run(make_sampler(path, fast=True), [job(7)])[0].sequences[0].tokens
    others = [greedy(PROMPTS[3], 20), SampleJob(prompt=PROMPTS[1], max_tokens=5, num_samples=3, top_p=0.9)]
    batched = run(make_sampler(path, fast=True), [others[0], job(7), others[1]])[1].sequences[0].tokens
    assert alone == batched
    assert run(make_sampler(path, fast=True), [job(8)])[0].sequences[0].tokens != alone
    multi = run(make_sampler(path, fast=True), [job(7, num_samples=3)])[0]
    assert multi.sequences[0].tokens == alone and len({tuple(s.tokens) for s in multi.sequences}) == 3
    ref = run(make_sampler(path, fast=True), [greedy(PROMPTS[0], 12, stop_at_eos=False)])[0].sequences[0].tokens
    assert run(make_sampler(path, fast=True), [job(3, top_k=1)])[0].sequences[0].tokens == ref


def test_fast_draws_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, -1).contiguous()
    seeds, positions = list(range(4000)), [9] * 4000

    def freq(p: SamplingParams) -> np.ndarray:
        toks = sampling.sample_fast(logits, [p] * 4000, seeds, positions)
        return np.bincount(toks.numpy(), minlength=4) / 4000

    assert np.abs(freq(SamplingParams(1.0)) - [0.5, 0.3, 0.15, 0.05]).max() < 0.03
    assert np.abs(freq(SamplingParams(1.0, top_k=2)) - [0.625, 0.375, 0, 0]).max() < 0.03
    assert np.abs(freq(SamplingParams(1.0, top_p=0.7)) - [0.625, 0.375, 0, 0]).max() < 0.03
    sq = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    assert np.abs(freq(SamplingParams(0.5)) - sq / sq.sum()).max() < 0.03
