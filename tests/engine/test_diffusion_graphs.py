"""The diffusion sampler's graph path (diffusion_graphs.py): requests get the tokens they get eagerly, across
algorithms, staggered joins (cached contexts rebuilt into and adopted from a graph's buffers) and split steps.
On the CPU the path runs its static buffers eagerly; on a GPU the same test replays real CUDA graphs."""

from concurrent.futures import Future

import pytest
import torch

from tinkerbell.engine.diffusion import DiffusionSampler
from tinkerbell.engine.models.loader import load_model
from tinkerbell.engine.types import SampleJob

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def model(request, tiny_llada_dir):
    return load_model(tiny_llada_dir, torch.float32, request.param)


def _run(model, jobs: list[SampleJob], graphs: bool, **kw) -> tuple[list[list[int]], dict]:
    dev = next(model.parameters()).device
    sampler = DiffusionSampler(model, dev, torch.float32, eos_token_ids=[], decode=lambda ids: "", max_context=512,
                               batch_size=16, cuda_graphs=graphs, **kw)
    futs = []
    for job in jobs:  # each joins a step after the previous: blocks and cache rebuilds fall on different steps
        futs.append(Future())
        sampler.add_request(job, futs[-1])
        sampler.step()
    while sampler.has_work():
        sampler.step()
    return [s.tokens for f in futs for s in f.result().sequences], sampler.stats()


JOBS = [SampleJob(prompt=[20 + i, 30, 31 + i], max_tokens=12, temperature=0.0, steps=12, block_length=4,
                  generation_algorithm=("basic", "prefix_cache", "dual_cache")[i % 3], stop_at_eos=False)
        for i in range(5)] + [
    SampleJob(prompt=[60, 61], max_tokens=8, temperature=0.7, seed=5, steps=8, block_length=4, num_samples=2,
              generation_algorithm="dual_cache", cfg_scale=1.0, stop_at_eos=False)]


@pytest.mark.parametrize("split_tokens", [0, 10_000])
def test_graph_path_gives_the_eager_tokens(model, split_tokens):
    eager, _ = _run(model, JOBS, graphs=False, split_tokens=split_tokens)
    graphed, stats = _run(model, JOBS, graphs=True, split_tokens=split_tokens)
    assert graphed == eager and stats["cuda_graph_replays"] > 0


def test_block_steps_of_a_steady_batch_replay(model):
    jobs = [SampleJob(prompt=[20 + i, 30], max_tokens=16, temperature=0.0, steps=16, block_length=4,
                      generation_algorithm="dual_cache", stop_at_eos=False) for i in range(3)]
    dev = next(model.parameters()).device
    sampler = DiffusionSampler(model, dev, torch.float32, eos_token_ids=[], decode=lambda ids: "", max_context=512,
                               cuda_graphs=True)
    for job in jobs:
        sampler.add_request(job, Future())
    while sampler.has_work():
        sampler.step()
    # 4 blocks of 4 steps: each block's first step rebuilds the cache (eager), the very first cached step
    # meets a new shape (eager, then captured): the other 11 replay.
    assert sampler.stats()["steps"] == 16 and sampler.stats()["cuda_graph_replays"] == 11


@pytest.mark.parametrize("env,expected", [(None, True), ("1", True), ("0", False), ("off", False)])
def test_graphs_are_on_by_default_on_cuda_and_the_environment_turns_them_off(monkeypatch, env, expected):
    from tinkerbell.engine.diffusion_graphs import ENV, wanted

    if env is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, env)
    assert wanted(torch.device("cuda"), None) is expected
    assert wanted(torch.device("cpu"), None) is False  # nothing to capture on the CPU
    assert wanted(torch.device("cuda"), False) is False and wanted(torch.device("cpu"), True) is True


def _run_all_at_once(model, jobs: list[SampleJob], **graph_limits) -> tuple[list[list[int]], DiffusionSampler]:
    """Every job admitted before the first step, on a graphed sampler whose GraphCache limits are overridden."""
    dev = next(model.parameters()).device
    sampler = DiffusionSampler(model, dev, torch.float32, eos_token_ids=[], decode=lambda ids: "", max_context=512,
                               batch_size=16, cuda_graphs=True)
    for name, value in graph_limits.items():
        setattr(sampler._graphs, name, value)
    futs = [Future() for _ in jobs]
    for job, fut in zip(jobs, futs):
        sampler.add_request(job, fut)
    while sampler.has_work():
        sampler.step()
    return [s.tokens for f in futs for s in f.result().sequences], sampler


@pytest.mark.parametrize("budget,replayed", [(1 << 30, True), (1024, False)])
def test_cached_contexts_too_big_for_a_second_copy_run_eagerly(model, budget, replayed):
    """A graph keeps its own copy of the cached context: past the memory budget (here 1 KiB, below the tiny
    model's cached contexts) the step runs eagerly instead, with the same tokens."""
    jobs = JOBS[1:3]  # prefix_cache and dual_cache: their cached steps are graphed within budget
    eager, _ = _run(model, jobs, graphs=False)
    graphed, sampler = _run_all_at_once(model, jobs, max_past_bytes=budget)
    assert graphed == eager
    assert (sampler.stats()["cuda_graph_replays"] > 0) is replayed


def test_forwards_of_many_tokens_run_eagerly_with_the_same_tokens(model):
    """Past the token cap a step is matmul-bound: no capture (which staggered arrivals would repeat per batch
    shape), the eager forward instead, with the same tokens."""
    jobs = JOBS[1:3]
    eager, _ = _run(model, jobs, graphs=False)
    # max_tokens=1: every step of these requests has more new tokens than that
    graphed, sampler = _run_all_at_once(model, jobs, max_tokens=1)
    assert graphed == eager
    assert sampler.stats()["cuda_graph_replays"] == 0 and sampler._graphs.captures == 0
