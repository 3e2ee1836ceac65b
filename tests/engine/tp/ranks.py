"""What each rank computes in the tensor-parallel tests (run by harness.run_ranks; with `tp=None` the same
function is the unsharded reference, run in the test process)."""

from __future__ import annotations

from pathlib import Path

import torch

from tinkerbell.engine.adapter_io import save_peft
from tinkerbell.engine.batch import BatchContext, SeqSpan
from tinkerbell.engine.kernels.paged_attention import meta_for_spans
from tinkerbell.engine.kv_cache import PagedKVCache
from tinkerbell.engine.lora import AdapterWeights, LoraBatch, LoraSegment, LoraSpec
from tinkerbell.engine.lora_gathered import GatheredLora
from tinkerbell.engine.lora_slots import LoraSlots
from tinkerbell.engine.models.loader import load_model
from tinkerbell.engine.tp.group import TPGroup
from tinkerbell.engine.tp.shard import shard_adapter


def nonzero_adapter(cfg, rank: int, seed: int) -> AdapterWeights:
    """A whole adapter with random B (a fresh one has B = 0 and would change nothing)."""
    w = AdapterWeights.init(cfg, LoraSpec(rank=rank), seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    for key in w.b:
        w.b[key] = torch.randn(w.b[key].shape, generator=g) * 0.3
    return w


def write_adapter(cfg, out_dir: Path, rank: int = 4, seed: int = 1) -> Path:
    save_peft(nonzero_adapter(cfg, rank, seed), out_dir, "tiny")
    return out_dir


def sampler_logits(tp: TPGroup | None, path: Path, seqs: list[list[int]], adapter_dir: Path) -> dict:
    """Full logits of the sampler's paths on one model: packed (plain layer loop), through the paged KV cache
    (prefill then one-token decodes, plain attention), and the fast path (fused projections and norms, paged
    attention kernel, gathered LoRA from the slots) with a checkpoint adapter on the second sequence."""
    model = load_model(path, torch.float32, "cpu", tp)
    cfg, shard = model.cfg, model.shard
    out: dict = {}
    ids = [torch.tensor(s) for s in seqs]
    with torch.no_grad():
        out["packed"] = model(torch.cat(ids), BatchContext.for_packed([len(s) for s in seqs]))
        kv_heads = shard.num_kv_heads if shard is not None else cfg.num_kv_heads
        cache = PagedKVCache(cfg.num_layers, 8, 4, kv_heads, cfg.head_dim, torch.float32, "cpu")
        seq, table, steps = ids[0], [6, 2, 5, 0], []
        ctx = BatchContext([SeqSpan(0, 6, 6, table)], cache, cache.slots(table, 6))
        steps.append(model(seq[:6], ctx))
        for i in range(6, len(seq)):
            ctx = BatchContext([SeqSpan(0, 1, i + 1, table)], cache, cache.slots(table, i + 1)[i:])
            steps.append(model(seq[i:i + 1], ctx))
        out["paged"] = torch.cat(steps)

        slots = LoraSlots(cfg, 2, 8, torch.float32, "cpu", shard=shard)
        slots.register("a", adapter_dir)
        slot = slots.acquire("a")
        model.fuse_projections()
        cache = PagedKVCache(cfg.num_layers, 16, 4, kv_heads, cfg.head_dim, torch.float32, "cpu")
        spans, start, slot_ids, row_slots = [], 0, [], []
        for j, s in enumerate(seqs):
            table = list(range(4 * j, 4 * j + 4))
            spans.append(SeqSpan(start, len(s), len(s), table))
            slot_ids.append(cache.slots(table, len(s)))
            row_slots += [slot if j == 1 else -1] * len(s)
            start += len(s)
        lora = GatheredLora.for_rows(slots, row_slots, torch.device("cpu"))
        ctx = BatchContext(spans, cache, torch.cat(slot_ids), lora=lora, attn=meta_for_spans(spans, "cpu"),
                           position_ids=torch.cat([torch.arange(len(s)) for s in seqs]))
        out["fast_lora"] = model(torch.cat(ids), ctx)
        # the same adapter through the plain path's segment loop (the whole adapter cut for this rank)
        from tinkerbell.engine.adapter_io import load_peft

        whole = load_peft(adapter_dir, cfg)
        local = shard_adapter(whole, shard) if shard is not None else whole
        n0 = len(seqs[0])
        lb = LoraBatch([LoraSegment(n0, n0 + len(seqs[1]), local)])
        out["plain_lora"] = model(torch.cat(ids), BatchContext.for_packed([len(s) for s in seqs], lora=lb))
    return out
