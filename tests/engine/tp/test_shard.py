"""Shard planning (local sizes, vocabulary ranges, refusals naming the config field) and sharded loading: each
rank's parameters are exactly its slices of the checkpoint, read slice by slice."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

from tinkerbell.engine.models import loader
from tinkerbell.engine.models.loader import load_model, read_config
from tinkerbell.engine.tp.group import TPGroup
from tinkerbell.engine.tp.shard import ROW_BIAS, param_split, plan_shard, vocab_ranges


def _cfg(tp_models, **changes):
    return dataclasses.replace(read_config(tp_models["llama_kv2"]), **changes)


def _rank(rank: int, world: int) -> TPGroup:
    """A rank's identity only: building and loading a sharded model issues no collective."""
    return TPGroup(rank=rank, world=world, group=None, cpu_group=None)


def test_vocab_ranges_cover_the_vocabulary_unevenly():
    assert vocab_ranges(383, 2) == [(0, 192), (192, 383)]
    assert vocab_ranges(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_kv_heads_split_when_at_least_tp(tp_models):
    s = plan_shard(_cfg(tp_models, num_heads=8, num_kv_heads=4), 1, 2)
    assert (s.num_heads, s.num_kv_heads, s.kv_head_start, s.kv_replicas) == (4, 2, 2, 1)
    assert s.local_cfg.num_kv_heads == 2 and s.local_cfg.intermediate_size == 64


def test_kv_heads_replicated_when_fewer_than_tp(tp_models):
    shards = [plan_shard(_cfg(tp_models, num_heads=8, num_kv_heads=2), r, 4) for r in range(4)]
    # rank r keeps the kv head its q heads [2r, 2r + 2) use: head h uses kv head h // 4
    assert [(s.kv_head_start, s.num_kv_heads, s.kv_replicas) for s in shards] == [(0, 1, 2), (0, 1, 2),
                                                                                (1, 1, 2), (1, 1, 2)]


@pytest.mark.parametrize("changes,world,field", [
    (dict(num_heads=6, num_kv_heads=6), 4, "num_attention_heads"),
    (dict(num_heads=8, num_kv_heads=6), 4, "num_key_value_heads"),
    (dict(num_heads=6, num_kv_heads=2), 3, "num_key_value_heads"),
    (dict(intermediate_size=130), 4, "intermediate_size"),
])
def test_indivisible_shapes_are_refused_naming_the_field(tp_models, changes, world, field):
    with pytest.raises(ValueError, match=field):
        plan_shard(_cfg(tp_models, **changes), 0, world)


@pytest.mark.parametrize("name", ["llama_biases", "qwen3_kv1_odd_vocab"])
def test_each_rank_loads_exactly_its_slices(name, tp_models):
    path = tp_models[name]
    full = dict(load_model(path, torch.float32, "cpu").named_parameters())
    for rank in range(2):
        model = load_model(path, torch.float32, "cpu", _rank(rank, 2))
        for pname, p in model.named_parameters():
            split = param_split(pname, model.shard)
            if split == ROW_BIAS:
                want = full[pname] if rank == 0 else torch.zeros_like(full[pname])
            elif split is None:
                want = full[pname]
            else:
                dim, start, end = split
                want = full[pname].narrow(dim, start, end - start)
            assert torch.equal(p, want), pname


def test_sharded_loading_reads_only_slices(tp_models, monkeypatch):
    """Whole tensors are read only where every rank needs all of them (norms) or rank 0 adds them (row
    biases); every other tensor comes through get_slice."""
    whole_reads: list[str] = []

    class Recording:
        def __init__(self, *a, **kw):
            self.inner = safe_open(*a, **kw)

        def __enter__(self):
            self.st = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.st.keys()

        def get_slice(self, name):
            return self.st.get_slice(name)

        def get_tensor(self, name):
            whole_reads.append(name)
            return self.st.get_tensor(name)

    monkeypatch.setattr(loader, "safe_open", Recording)
    model = load_model(tp_models["llama_biases"], torch.float32, "cpu", _rank(1, 2))
    assert whole_reads and all(n.endswith("norm.weight") for n in whole_reads), whole_reads
    assert model.shard.rank == 1


def test_diffusion_models_refuse_tp(tiny_llada_dir):
    with pytest.raises(ValueError, match="--tp"):
        load_model(tiny_llada_dir, torch.float32, "cpu", _rank(0, 2))


def test_sharded_adapter_init_is_the_tp1_init_cut(tp_models):
    """Every rank draws the whole adapter from the seed and keeps its piece: TP 2 starts where TP 1 does."""
    from tinkerbell.engine.lora import AdapterWeights, LoraSpec
    from tinkerbell.engine.tp.shard import shard_adapter

    cfg = read_config(tp_models["qwen3_kv1_odd_vocab"])
    whole = AdapterWeights.init(cfg, LoraSpec(rank=4), seed=7)
    for rank in range(2):
        shard = plan_shard(cfg, rank, 2)
        local = AdapterWeights.init(cfg, LoraSpec(rank=4), seed=7, shard=shard)
        want = shard_adapter(whole, shard)
        assert all(torch.equal(local.a[k], want.a[k]) and torch.equal(local.b[k], want.b[k]) for k in whole.a)
        assert local.b["lm_head"].shape == (shard.vocab_size, 4)
        assert local.a["model.layers.0.self_attn.o_proj"].shape == (4, shard.num_heads * cfg.head_dim)


def test_sharded_adapter_init_needs_a_seed(tp_models):
    from tinkerbell.engine.lora import AdapterWeights, LoraSpec

    cfg = read_config(tp_models["llama_kv2"])
    with pytest.raises(ValueError, match="seed"):
        AdapterWeights.init(cfg, LoraSpec(rank=4), seed=None, shard=plan_shard(cfg, 0, 2))
