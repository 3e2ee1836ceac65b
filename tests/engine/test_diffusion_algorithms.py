"""Diffusion generation against plain re-implementations of the published algorithms (LLaDA's generate.py and
Fast-dLLM's prefix/dual-cache loops), written here from the papers' pseudo-code, one request at a time, on the
model's plain forward (the modules as written): the sampler runs the fused forward, so these also hold it to
the plain one."""

from concurrent.futures import Future

import pytest
import torch

from tinkerbell.engine.diffusion import DiffusionSampler, select_transfer, transfer_schedule
from tinkerbell.engine.models.loader import load_model
from tinkerbell.engine.types import EngineUserError, SampleJob


@pytest.fixture(scope="module")
def model(tiny_llada_dir):
    return load_model(tiny_llada_dir, torch.float32, "cpu")


def make_sampler(model, **kw):
    return DiffusionSampler(model, torch.device("cpu"), torch.float32, eos_token_ids=[], decode=lambda ids: "",
                            max_context=512, **kw)


def run(sampler, *jobs):
    futs = []
    for job in jobs:
        futs.append(Future())
        sampler.add_request(job, futs[-1])
    while sampler.has_work():
        sampler.step()
    return [f.result() for f in futs]


def _full(model, x):
    n = x.shape[1]
    logits, _ = model(x, torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool), plain=True)
    return logits


def reference_generate(model, prompt, steps, gen_length, block_length, cfg_scale=0.0):
    """LLaDA's reference loop at temperature 0 with low-confidence remasking, batch of one."""
    mask_id = model.cfg.mask_token_id
    p = len(prompt)
    x = torch.full((1, p + gen_length), mask_id, dtype=torch.long)
    x[0, :p] = torch.tensor(prompt)
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for b in range(num_blocks):
        block_mask = x[:, p + b * block_length:p + (b + 1) * block_length] == mask_id
        count = int(block_mask.sum())
        schedule = [count // steps_per_block + (1 if i < count % steps_per_block else 0)
                    for i in range(steps_per_block)]
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = _full(model, x), _full(model, un_x)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = _full(model, x)
            x0 = logits.argmax(-1)[None]
            x0_p = torch.gather(torch.softmax(logits, -1), -1, x0[0, :, None])[None, :, 0]
            x0_p[:, p + (b + 1) * block_length:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -float("inf"))
            _, sel = torch.topk(confidence[0], k=schedule[i])
            x[0, sel] = x0[0, sel]
    return x[0, p:].tolist()


def reference_cached(model, prompt, steps, gen_length, block_length, dual):
    """Fast-dLLM's prefix-cache / dual-cache loops at temperature 0, batch of one, written with our model's
    cached-keys forward."""
    mask_id = model.cfg.mask_token_id
    p = len(prompt)
    x = torch.full((p + gen_length,), mask_id, dtype=torch.long)
    x[:p] = torch.tensor(prompt)
    n = len(x)
    spb = steps // (gen_length // block_length)

    def commit(logits, region, k):
        mask = region == mask_id
        x0 = logits.argmax(-1)
        conf = torch.where(mask, torch.softmax(logits, -1).gather(-1, x0[:, None])[:, 0], -float("inf"))
        sel = conf.topk(k).indices
        region[sel] = x0[sel]

    for b in range(gen_length // block_length):
        s, e = p + b * block_length, p + (b + 1) * block_length
        schedule = transfer_schedule(block_length, spb)
        logits, kv = model(x[None], torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool), want_kv=True,
                           plain=True)
        commit(logits[s:e], x[s:e], schedule[0])
        for i in range(1, spb):
            if dual:
                past = torch.cat([kv[:, :, :, :s], kv[:, :, :, e:]], dim=3)
                q = x[s:e]
            else:
                past, q = kv[:, :, :, :s], x[s:]
            keys = past.shape[3] + len(q)
            logits, _ = model(q[None], torch.arange(s, s + len(q))[None], torch.ones(1, keys, dtype=torch.bool),
                              past=past, plain=True)
            commit(logits[:block_length], x[s:e], schedule[i])
    return x[p:].tolist()


PROMPTS = [[5, 17, 42, 9, 33], [100, 7, 7, 250, 31, 8, 77, 12, 64]]


@pytest.mark.parametrize("steps,gen,block", [(8, 8, 8), (8, 16, 4), (12, 12, 4), (4, 16, 8)])
def test_basic_equals_reference_at_temperature_0(model, steps, gen, block):
    sampler = make_sampler(model)
    for prompt in PROMPTS:
        job = SampleJob(prompt=prompt, max_tokens=gen, temperature=0.0, steps=steps, block_length=block,
                        generation_algorithm="basic")
        (res,) = run(sampler, job)
        assert res.sequences[0].tokens == reference_generate(model, prompt, steps, gen, block)
        assert len(res.sequences[0].logprobs) == gen and res.sequences[0].stop_reason == "length"


def test_aliases_and_cfg_equal_reference(model):
    sampler = make_sampler(model)
    prompt = PROMPTS[0]
    for alias in ("no_cache", "simple"):
        job = SampleJob(prompt=prompt, max_tokens=8, temperature=0.0, steps=8, block_length=4,
                        generation_algorithm=alias, cfg_scale=1.5)
        (res,) = run(sampler, job)
        assert res.sequences[0].tokens == reference_generate(model, prompt, 8, 8, 4, cfg_scale=1.5)


@pytest.mark.parametrize("algorithm,dual", [("prefix_cache", False), ("dual_cache", True)])
def test_cached_algorithms_equal_fast_dllm_loops(model, algorithm, dual):
    sampler = make_sampler(model)
    for prompt in PROMPTS:
        job = SampleJob(prompt=prompt, max_tokens=16, temperature=0.0, steps=8, block_length=8,
                        generation_algorithm=algorithm)
        (res,) = run(sampler, job)
        assert res.sequences[0].tokens == reference_cached(model, prompt, 8, 16, 8, dual)


def test_threshold_extremes_reduce_to_fixed_schedules(model):
    sampler = make_sampler(model)
    prompt = PROMPTS[1]
    base = dict(prompt=prompt, max_tokens=12, temperature=0.0, block_length=4)
    (one_per_step,) = run(sampler, SampleJob(**base, steps=12))
    (all_at_once,) = run(sampler, SampleJob(**base, steps=3))
    # threshold 1.0: nothing clears it, so each step commits only its most confident token.
    (t_high,) = run(sampler, SampleJob(**base, steps=3, threshold=1.0))
    (t_low,) = run(sampler, SampleJob(**base, steps=12, threshold=1e-12))
    assert t_high.sequences[0].tokens == one_per_step.sequences[0].tokens
    assert t_low.sequences[0].tokens == all_at_once.sequences[0].tokens
    # factor huge: every bound is negative, a block goes in one step; factor tiny: one token per step until
    # two are left, which the reference's edge rule commits together (4 -> 3 -> 2 -> 0: three steps a block).
    for factor, steps in ((1e9, 3), (1e-9, 9)):
        before = sampler.stats()["steps"]
        (res,) = run(sampler, SampleJob(**base, steps=12, factor=factor))
        assert sampler.stats()["steps"] - before == steps and len(res.sequences[0].tokens) == 12


def test_transfer_rules():
    assert transfer_schedule(10, 4) == [3, 3, 2, 2] and transfer_schedule(2, 4) == [1, 1, 0, 0]
    inf = float("-inf")
    conf = torch.tensor([0.95, inf, 0.5, 0.91, 0.2], dtype=torch.float64)
    assert select_transfer(conf, 4, 2, None, None).tolist() == [True, False, False, True, False]
    assert select_transfer(conf, 4, None, 0.9, None).tolist() == [True, False, False, True, False]
    low = torch.tensor([0.3, 0.2, inf], dtype=torch.float64)
    assert select_transfer(low, 2, None, 0.9, None).tolist() == [True, False, False]  # at least one
    # factor 1: bounds -1, 1-1/3, 1-1/4, 1-1/5 for n = 1..4; 0.95 and 0.91 pass n=1,2; 0.5 fails n=3.
    assert select_transfer(conf, 4, None, None, 1.0).tolist() == [True, False, False, True, False]
    # Failing only at the last candidate commits all of them (the reference's edge case).
    conf2 = torch.tensor([0.99, 0.98, 0.1], dtype=torch.float64)
    assert select_transfer(conf2, 3, None, None, 1.0).tolist() == [True, True, True]


def test_bad_requests_are_user_errors(model):
    sampler = make_sampler(model)
    bad = [
        (dict(generation_algorithm="fastest"), "generation_algorithm: unknown algorithm 'fastest'"),
        (dict(remasking="lowest"), "remasking"),
        (dict(threshold=1.5), "threshold"),
        (dict(threshold=0.9, factor=1.0), "at most one"),
        (dict(steps=0), "steps"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(prompt=[1, model.cfg.mask_token_id]), "mask token"),
        (dict(adapter_key="x"), "adapter_key"),
        (dict(max_tokens=600), "context limit"),
    ]
    for kw, msg in bad:
        job = SampleJob(**{"prompt": [10, 20, 30], "max_tokens": 8, **kw})
        with pytest.raises(EngineUserError, match=msg):
            sampler.add_request(job, Future())
    assert not sampler.has_work()
    with pytest.raises(EngineUserError):
        make_sampler(model, algorithm="nope")


def test_cli_algorithm_names_match_the_engine():
    from tinkerbell.config import DIFFUSION_ALGORITHMS
    from tinkerbell.engine.diffusion import ALGORITHMS, ALIASES

    assert set(DIFFUSION_ALGORITHMS) == set(ALGORITHMS) | set(ALIASES)
