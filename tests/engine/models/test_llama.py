"""Our Llama/Qwen modules give HF transformers' logits (float32), packed and through the paged KV cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tinkerbell.engine.batch import BatchContext, SeqSpan
from tinkerbell.engine.kv_cache import PagedKVCache
from tinkerbell.engine.models.loader import load_model

ARCHS = ["tiny_llama_dir", "tiny_qwen3_dir", "tiny_qwen2_dir"]


def _reference(path, seqs):
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf(s[None]).logits[0] for s in seqs]


@pytest.mark.parametrize("fixture", ARCHS)
def test_packed_logits_match_hf(fixture, request):
    path = request.getfixturevalue(fixture)
    model = load_model(path, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g) for n in (5, 17, 9)]
    with torch.no_grad():
        ours = model(torch.cat(seqs), BatchContext.for_packed([len(s) for s in seqs]))
    ref = torch.cat(_reference(path, seqs))
    lp, lr = ours.log_softmax(-1), ref.log_softmax(-1)
    assert (lp - lr).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fixture", ARCHS)
def test_paged_decode_matches_full_forward(fixture, request):
    path = request.getfixturevalue(fixture)
    model = load_model(path, torch.float32, "cpu")
    cfg = model.cfg
    seq = torch.randint(0, cfg.vocab_size, (13,), generator=torch.Generator().manual_seed(1))
    cache = PagedKVCache(cfg.num_layers, 8, 4, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    table = [6, 2, 5, 0]  # deliberately out of order
    outs = []
    with torch.no_grad():
        ctx = BatchContext([SeqSpan(0, 6, 6, table)], cache, cache.slots(table, 6))
        outs.append(model(seq[:6], ctx))
        for i in range(6, len(seq)):
            ctx = BatchContext([SeqSpan(0, 1, i + 1, table)], cache, cache.slots(table, i + 1)[i:])
            outs.append(model(seq[i : i + 1], ctx))
    ref = _reference(path, [seq])[0]
    assert (torch.cat(outs) - ref).abs().max().item() <= 1e-4


def test_cached_rope_table_equals_computed_rope(tiny_llama_dir):
    model = load_model(tiny_llama_dir, torch.float32, "cpu")
    pos = torch.tensor([0, 5, 17, 63])
    cos, sin = model.rope(pos, torch.float32)
    model.cache_rope(64, torch.float32)
    assert torch.equal(model.rope_cache[pos][:, 0], cos) and torch.equal(model.rope_cache[pos][:, 1], sin)
