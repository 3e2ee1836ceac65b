"""A step whose rows feed very different widths (rows building their cache feed the whole sequence, cached rows
a block) runs as two forwards, and every request still gets exactly the tokens it gets alone."""

from concurrent.futures import Future

import pytest
import torch

from tinkerbell.engine.diffusion import DiffusionSampler
from tinkerbell.engine.models.loader import load_model
from tinkerbell.engine.types import SampleJob


@pytest.fixture(scope="module")
def model(tiny_llada_dir):
    return load_model(tiny_llada_dir, torch.float32, "cpu")


def _run(model, jobs: list[SampleJob], stagger: bool, **kw) -> tuple[list[list[int]], dict]:
    """Run `jobs` on one sampler; with `stagger`, each joins one step after the previous (so their blocks
    start, and their caches are rebuilt, on different steps)."""
    sampler = DiffusionSampler(model, torch.device("cpu"), torch.float32, eos_token_ids=[], decode=lambda ids: "",
                               max_context=512, batch_size=16, **kw)
    futs = []
    for job in jobs:
        futs.append(Future())
        sampler.add_request(job, futs[-1])
        if stagger:  # one step that runs (an idle sampler first gathers what arrives with the first request)
            ran = sampler.stats()["steps"]
            while sampler.stats()["steps"] == ran:
                sampler.step()
    while sampler.has_work():
        sampler.step()
    return [f.result().sequences[0].tokens for f in futs], sampler.stats()


JOBS = [SampleJob(prompt=[20 + i, 30, 31 + i], max_tokens=12, temperature=0.0, steps=12, block_length=4,
                  generation_algorithm="dual_cache" if i % 2 else "prefix_cache", stop_at_eos=False)
        for i in range(4)]


def test_split_step_gives_each_request_its_tokens_alone(model):
    alone = [_run(model, [job], stagger=False)[0][0] for job in JOBS]
    split, stats = _run(model, JOBS, stagger=True, split_tokens=0)
    assert split == alone
    assert stats["forwards"] > stats["steps"]  # some steps did run as two forwards


def test_small_waste_stays_one_forward(model):
    merged, stats = _run(model, JOBS, stagger=True, split_tokens=10_000)
    assert stats["forwards"] == stats["steps"]
    assert merged == [_run(model, [job], stagger=False)[0][0] for job in JOBS]
