"""The sharded model (gloo, 2 ranks on the CPU) computes the unsharded model's full logits on every path the
sampler takes: packed, paged KV cache, and the fast path with fused projections and gathered LoRA slots."""

from __future__ import annotations

import pytest
import torch

from tests.engine.tp import ranks
from tests.engine.tp.harness import run_ranks
from tinkerbell.engine.models.loader import read_config

TOL = 1e-5


def _seqs(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    # ids from both ends of the vocabulary, so every rank's embedding and head shard is used
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (11, 7)]
    seqs[0][:2] = [0, vocab - 1]
    return seqs


@pytest.mark.parametrize("name", ["llama_kv2", "qwen3_kv1_odd_vocab", "llama_biases"])
def test_sharded_logits_equal_unsharded(name, tp_models, tmp_path):
    path = tp_models[name]
    cfg = read_config(path)
    adapter = ranks.write_adapter(cfg, tmp_path / "adapter")
    seqs = _seqs(cfg.vocab_size)
    ref = ranks.sampler_logits(None, path, seqs, adapter)
    outs = run_ranks(ranks.sampler_logits, 2, path, seqs, adapter)
    for rank_out in outs:  # every rank holds the full logits
        for key, want in ref.items():
            got = rank_out[key]
            assert got.shape == want.shape, key
            assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item()), key
    assert (ref["fast_lora"] - ref["packed"]).abs().max() > 1e-2  # the adapter is live
