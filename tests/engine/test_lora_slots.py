"""LoRA slots: stacked rank-padded storage, lazy loading, LRU eviction, pinning, re-registration, limits."""

import pytest
import torch

from tinkerbell.engine.adapter_io import save_peft
from tinkerbell.engine.lora import AdapterWeights, LoraSpec
from tinkerbell.engine.lora_slots import LoraSlots
from tinkerbell.engine.models.loader import read_config
from tinkerbell.engine.types import EngineUserError


def _adapter(cfg, rank: int, seed: int, **kw) -> AdapterWeights:
    w = AdapterWeights.init(cfg, LoraSpec(rank=rank, **kw), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for k in w.b:
        w.b[k] = torch.randn(w.b[k].shape, generator=g)
    return w


@pytest.fixture
def cfg(tiny_llama_dir):
    return read_config(tiny_llama_dir)


def test_load_into_stacked_views_zero_padded(cfg):
    slots = LoraSlots(cfg, max_loras=2, max_lora_rank=8, dtype=torch.float32, device="cpu")
    w = _adapter(cfg, rank=4, seed=1, train_mlp=False)
    slots.register("a", w)
    s = slots.acquire("a")
    assert s is not None
    view = slots.weights(s)
    key = "model.layers.0.self_attn.q_proj"
    assert torch.equal(view.a[key], w.a[key]) and torch.equal(view.b[key], w.b[key])
    assert view.a[key].data_ptr() == slots.a[key][s].data_ptr()  # a view into the stacked tensor
    assert (slots.a[key][s, 4:] == 0).all() and (slots.b[key][s, :, 4:] == 0).all()
    assert "model.layers.0.mlp.up_proj" not in view.a  # untrained targets are skipped
    assert (slots.a["model.layers.0.mlp.up_proj"][s] == 0).all()
    # The slot keeps its own copy: the trainer changing its weights later does not leak in.
    w.b[key].add_(1.0)
    assert not torch.equal(view.b[key], w.b[key])


def test_lru_eviction_and_pinning(cfg):
    slots = LoraSlots(cfg, max_loras=2, max_lora_rank=4, dtype=torch.float32, device="cpu")
    for i, k in enumerate("abc"):
        slots.register(k, _adapter(cfg, rank=2, seed=i))
    sa, sb = slots.acquire("a"), slots.acquire("b")
    assert {sa, sb} == {0, 1}
    assert slots.acquire("c") is None  # every slot pinned: the caller waits
    slots.release(sb)
    slots.release(sa)
    slots.release(slots.acquire("a"))  # a is now the more recently used
    sc = slots.acquire("c")
    assert sc == sb and sorted(slots.resident()) == ["a", "c"]  # b was least recently used
    assert slots.loads == 3
    slots.release(slots.acquire("a"))
    assert slots.loads == 3  # resident: no reload


def test_reregister_replaces_and_running_keeps_old(cfg):
    slots = LoraSlots(cfg, max_loras=2, max_lora_rank=4, dtype=torch.float32, device="cpu")
    old, new = _adapter(cfg, rank=2, seed=1), _adapter(cfg, rank=3, seed=2)
    slots.register("a", old)
    s_old = slots.acquire("a")
    slots.register("a", new)
    key = "lm_head"
    assert torch.equal(slots.weights(s_old).b[key], old.b[key])  # still pinned: unchanged
    s_new = slots.acquire("a")
    assert s_new != s_old and torch.equal(slots.weights(s_new).b[key], new.b[key])
    assert slots.cache_salt(s_new) != slots.cache_salt(s_old)  # their K/V must never share a prefix block
    slots.release(s_old)
    assert slots.resident() == ["a"] and slots.slots[s_old].key is None


def test_checkpoint_source_loads_lazily(cfg, tmp_path):
    w = _adapter(cfg, rank=4, seed=3)
    save_peft(w, tmp_path, base_model="x")
    slots = LoraSlots(cfg, max_loras=1, max_lora_rank=4, dtype=torch.float32, device="cpu")
    slots.register("p", tmp_path)
    assert slots.loads == 0
    s = slots.acquire("p")
    assert slots.loads == 1
    assert torch.allclose(slots.weights(s).a["lm_head"], w.a["lm_head"])


def test_limits_and_errors(cfg, tmp_path):
    slots = LoraSlots(cfg, max_loras=1, max_lora_rank=4, dtype=torch.float32, device="cpu")
    with pytest.raises(EngineUserError, match=r"rank 8.*limit of 4.*--max-lora-rank"):
        slots.register("big", _adapter(cfg, rank=8, seed=0))
    save_peft(_adapter(cfg, rank=8, seed=0), tmp_path, base_model="x")
    with pytest.raises(EngineUserError, match="--max-lora-rank"):
        slots.register("big", tmp_path)
    with pytest.raises(EngineUserError, match="adapter_key"):
        slots.acquire("missing")
    with pytest.raises(EngineUserError, match="max-loras 0"):
        LoraSlots(cfg, 0, 4, torch.float32, "cpu").register("a", _adapter(cfg, rank=2, seed=0))
    bad = _adapter(cfg, rank=2, seed=0)
    bad.a["lm_head"] = torch.zeros(2, 7)
    with pytest.raises(EngineUserError, match="does not fit"):
        slots.register("bad", bad)


def test_reuse_after_larger_tenant_zeroes_its_tail_and_flags(cfg):
    # One slot: a rank-8 adapter on every module, then a rank-2 attention-only one takes the slot over.
    slots = LoraSlots(cfg, max_loras=1, max_lora_rank=8, dtype=torch.float32, device="cpu")
    big, small = _adapter(cfg, rank=8, seed=3), _adapter(cfg, rank=2, seed=4, train_mlp=False)
    slots.register("big", big)
    slots.release(slots.acquire("big"))
    slots.register("small", small, copy=False)
    s = slots.acquire("small")
    q, up = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"
    assert torch.equal(slots.a[q][s, :2], small.a[q]) and (slots.a[q][s, 2:] == 0).all()
    assert torch.equal(slots.b[q][s, :, :2], small.b[q]) and (slots.b[q][s, :, 2:] == 0).all()
    assert (slots.a[up][s] == 0).all() and (slots.b[up][s] == 0).all()
    assert slots.present[q][s] == 1 and slots.present[up][s] == 0
    assert slots.scales[s] == pytest.approx(small.spec.scale)


def test_slot_reloaded_after_another_tenant_holds_exactly_the_adapter(cfg):
    # big → small → big through one slot: the second load of "big" reuses its cached views and must restore
    # every module "small" zeroed or overwrote.
    slots = LoraSlots(cfg, max_loras=1, max_lora_rank=8, dtype=torch.float32, device="cpu")
    big, small = _adapter(cfg, rank=8, seed=3), _adapter(cfg, rank=2, seed=4, train_mlp=False)
    slots.register("big", big)
    slots.register("small", small)
    for key in ("big", "small", "big"):
        slots.release(slots.acquire(key))
    s = slots.acquire("big")
    for k in big.a:
        assert torch.equal(slots.a[k][s], big.a[k]) and torch.equal(slots.b[k][s], big.b[k])
        assert slots.present[k][s] == 1
    assert slots.loads == 3


def test_register_without_copy_keeps_the_callers_tensors(cfg):
    slots = LoraSlots(cfg, max_loras=1, max_lora_rank=8, dtype=torch.float32, device="cpu")
    w = _adapter(cfg, rank=4, seed=5)
    slots.register("mine", w, copy=False)  # a fresh snapshot handed over (the trainer's handoff)
    key = "model.layers.0.self_attn.q_proj"
    assert slots._sources["mine"].weights.a[key] is w.a[key]
    slots.register("copied", w)
    assert slots._sources["copied"].weights.a[key].data_ptr() != w.a[key].data_ptr()
