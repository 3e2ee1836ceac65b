"""LoRA slots of a sharded model hold this rank's pieces: in-memory adapters must already be cut (a whole one is
refused, naming the shapes), checkpoints are whole and are cut on load."""

from __future__ import annotations

import pytest
import torch

from tests.engine.tp import ranks
from tinkerbell.engine.adapter_io import load_peft
from tinkerbell.engine.lora import AdapterWeights, LoraSpec
from tinkerbell.engine.lora_slots import LoraSlots
from tinkerbell.engine.models.loader import read_config
from tinkerbell.engine.tp.shard import plan_shard, shard_adapter
from tinkerbell.engine.types import EngineUserError


def test_slots_take_local_pieces_and_refuse_a_whole_adapter(tp_models):
    cfg = read_config(tp_models["qwen3_kv1_odd_vocab"])
    shard = plan_shard(cfg, 1, 2)
    slots = LoraSlots(cfg, 2, 8, torch.float32, "cpu", shard=shard)
    whole = AdapterWeights.init(cfg, LoraSpec(rank=4), seed=0)
    assert slots.b["lm_head"].shape == (2, shard.vocab_size, 8)
    slots.register("local", shard_adapter(whole, shard))
    with pytest.raises(EngineUserError, match="does not fit"):
        slots.register("whole", whole)


def test_a_whole_checkpoint_is_cut_on_load(tp_models, tmp_path):
    cfg = read_config(tp_models["llama_kv2"])
    path = ranks.write_adapter(cfg, tmp_path / "adapter")
    shard = plan_shard(cfg, 1, 2)
    slots = LoraSlots(cfg, 1, 8, torch.float32, "cpu", shard=shard)
    slots.register("ckpt", path)
    view = slots.weights(slots.acquire("ckpt"))
    want = shard_adapter(load_peft(path, cfg), shard)
    assert all(torch.equal(view.a[k], want.a[k]) and torch.equal(view.b[k], want.b[k]) for k in want.a)
