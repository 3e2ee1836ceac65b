"""Token selection: greedy, temperature, top-k / top-p filters, per-sequence generators, raw top-k logprobs."""

import numpy as np
import torch

from tinkerbell.engine import sampling
from tinkerbell.engine.sampling import SamplingParams


def _logits(rows: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def _gens(n: int, seed: int = 5) -> list[torch.Generator]:
    return [sampling.make_generator(seed, i, torch.device("cpu")) for i in range(n)]


def test_greedy_top_k_1_and_tiny_top_p_are_argmax():
    logits = _logits()
    expected = logits.argmax(-1)
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1e-30),
                   SamplingParams(temperature=1.0, top_k=1),
                   SamplingParams(temperature=1.3, top_p=1e-6)):
        got = sampling.sample(logits.clone(), [params] * 3, _gens(3))
        assert torch.equal(got, expected), params


def test_same_generator_seed_same_tokens_regardless_of_neighbours():
    logits = _logits(rows=4)
    p = SamplingParams(temperature=1.0)
    alone = sampling.sample(logits[2:3].clone(), [p], [sampling.make_generator(11, 0, torch.device("cpu"))])
    mixed_params = [SamplingParams(0.0), SamplingParams(0.7, top_k=5), p, SamplingParams(1.0, top_p=0.5)]
    gens = _gens(4)
    gens[2] = sampling.make_generator(11, 0, torch.device("cpu"))
    batched = sampling.sample(logits.clone(), mixed_params, gens)
    assert batched[2] == alone[0]


def test_different_seeds_give_different_streams():
    logits = torch.zeros(1, 1000)  # uniform: two streams agreeing 20 times by chance is impossible

    def stream(seed: int, index: int) -> list[int]:
        gen = sampling.make_generator(seed, index, torch.device("cpu"))
        return [sampling.sample(logits.clone(), [SamplingParams(1.0)], [gen]).item() for _ in range(20)]

    assert stream(1, 0) == stream(1, 0)
    assert stream(2, 0) != stream(1, 0)
    assert stream(1, 1) != stream(1, 0)  # another sample of the same request


def test_draws_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = sampling.make_generator(0, 0, torch.device("cpu"))
    n = 4000

    def freq(params: SamplingParams) -> np.ndarray:
        counts = np.zeros(4)
        for _ in range(n):
            counts[sampling.sample(logits.clone(), [params], [gen]).item()] += 1
        return counts / n

    assert np.abs(freq(SamplingParams(1.0)) - [0.5, 0.3, 0.15, 0.05]).max() < 0.03
    assert np.abs(freq(SamplingParams(1.0, top_k=2)) - [0.625, 0.375, 0, 0]).max() < 0.03
    # top_p 0.7: {0.5, 0.3} reaches it; 0.15 and 0.05 go.
    assert np.abs(freq(SamplingParams(1.0, top_p=0.7)) - [0.625, 0.375, 0, 0]).max() < 0.03
    # Temperature 0.5 squares the probabilities before renormalising.
    sq = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    assert np.abs(freq(SamplingParams(0.5)) - sq / sq.sum()).max() < 0.03


def test_random_seed_when_none():
    assert sampling.derive_seed(None, 0) != sampling.derive_seed(None, 0)
    assert sampling.derive_seed(3, 0) == sampling.derive_seed(3, 0) != sampling.derive_seed(3, 1)


def test_topk_and_empty_rows():
    lp = _logits(rows=2).log_softmax(-1)
    ids, vals = sampling.topk(lp, 3)
    assert ids.dtype == np.int32 and vals.dtype == np.float32 and ids.shape == (2, 3)
    ref_v, ref_i = lp.topk(3)
    assert np.array_equal(ids, ref_i.numpy()) and np.allclose(vals, ref_v.numpy())
    eids, evals = sampling.empty_topk(4, 2)
    assert (eids == 0).all() and (evals == -99999.0).all()
