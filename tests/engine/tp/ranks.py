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
from tinkerbell.engine.models.loader import load_model, read_config
from tinkerbell.engine.tp.group import TPGroup
from tinkerbell.engine.tp.shard import shard_adapter


def nonzero_adapter(cfg, rank: int, seed: int, scale: float) -> AdapterWeights:
    """A whole adapter with random B (a fresh one has B = 0 and would change nothing)."""
    w = AdapterWeights.init(cfg, LoraSpec(rank=rank), seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    for key in w.b:
        w.b[key] = torch.randn(w.b[key].shape, generator=g) * scale
    return w


def write_adapter(cfg, out_dir: Path, rank: int = 4, seed: int = 1, scale: float = 0.3) -> Path:
    save_peft(nonzero_adapter(cfg, rank, seed, scale), out_dir, "tiny")
    return out_dir


def sequences(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    # ids from both ends of the vocabulary, so every rank's embedding and head shard is used
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (11, 7)]
    seqs[0][:2] = [0, vocab - 1]
    return seqs


# (model, T) cases of the TP tests: kv heads split (llama 2 kv / T 2), replicated on every rank (qwen3 1 kv /
# T 2) and on pairs of ranks (llama 2 kv / T 4); uneven vocabulary shards (383 ids); q/k/v/o and MLP biases.
CASES = [("llama_kv2", 2), ("qwen3_kv1_odd_vocab", 2), ("llama_biases", 2), ("llama_kv2", 4)]
CASE_IDS = [f"{n}-tp{w}" for n, w in CASES]


def all_checks_many(tp: TPGroup | None, jobs: list[tuple]) -> list[dict]:
    """`all_checks` for several models in one spawn of the ranks."""
    return [all_checks(tp, *job) for job in jobs]


def all_checks(tp: TPGroup | None, path: Path, sampler_adapter: Path, train_adapter: Path, save_dir: Path) -> dict:
    """Everything the TP tests compare, in one spawn of the ranks (starting processes is the slow part)."""
    seqs = sequences(read_config(path).vocab_size)
    return {"sampler": sampler_logits(tp, path, seqs, sampler_adapter),
            "train": train_steps(tp, path, train_adapter, save_dir)}


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
        # in-memory weights (a trainer snapshot is this rank's pieces) into a slot: the same logits
        slots.register("m", local)
        mem = slots.acquire("m")
        assert mem != slot
        ctx.lora = GatheredLora.for_rows(slots, [mem if r >= 0 else -1 for r in row_slots], torch.device("cpu"))
        out["fast_lora_in_memory"] = model(torch.cat(ids), ctx)
    return out


def cross_entropy_data(vocab: int, seed: int = 0, lengths: tuple[int, ...] = (6, 11, 4)) -> list:
    """Datums whose targets span both ends of the vocabulary (every rank's range holds some)."""
    import numpy as np

    from tinkerbell.engine.types import TrainDatum

    g = torch.Generator().manual_seed(seed)
    data = []
    for n in lengths:
        target = torch.randint(0, vocab, (n,), generator=g).numpy()
        target[:2] = [0, vocab - 1]
        weights = (torch.rand(n, generator=g) + 0.5).numpy().astype(np.float32)
        data.append(TrainDatum(torch.randint(0, vocab, (n,), generator=g).numpy(),
                               {"target_tokens": target, "weights": weights}))
    return data


def _whole(named: list[tuple[str, torch.Tensor]], tp: TPGroup | None, shard) -> dict[str, torch.Tensor]:
    """Whole tensors of this rank's pieces (gathered to rank 0 under tp; other ranks get {})."""
    from tinkerbell.engine.tp.shard import gather_lora_tensors

    if tp is None:
        return {n: t.detach().clone() for n, t in named}
    whole = gather_lora_tensors(named, tp, shard)
    return {} if whole is None else {n: t for (n, _), t in zip(named, whole)}


def train_steps(tp: TPGroup | None, path: Path, adapter_dir: Path, save_dir: Path, steps: int = 2) -> dict:
    """Load a (non-zero B) adapter with its run, then `steps` × (forward_backward, AdamW step), logits in
    5-row chunks; records per step the target logprobs and loss, the gradients the step used (replicated
    tensors summed over ranks, as the step does), and after the last step the parameters (whole, and this
    rank's own pieces), then saves the run with its optimizer state into `save_dir` (rank 0 writes)."""
    from tinkerbell.engine.tp.shard import sync_replicated_grads
    from tinkerbell.engine.training import Trainer
    from tinkerbell.engine.types import AdamParams

    model = load_model(path, torch.float32, "cpu", tp)
    vocab_share = model.shard.vocab_sizes[0] if model.shard is not None else model.cfg.vocab_size
    trainer = Trainer(model, torch.device("cpu"), logits_chunk_elems=5 * vocab_share, tp=tp)
    trainer.load("r", adapter_dir, with_optimizer=False)
    opt = trainer._runs["r"].optimizer  # noqa: SLF001 - the test reads the run's leaves and moments
    # eps well above float32 noise: Adam's first steps move each weight by ~lr·sign(grad), so with a tiny eps a
    # gradient entry that is zero up to rounding would flip sign between TP 1 and TP 2 and amplify the rounding.
    hp = AdamParams(learning_rate=1e-2, eps=1e-3, weight_decay=0.01, grad_clip_norm=50.0)
    out: dict = {"logprobs": [], "loss": [], "grads": [], "grad_norm": []}
    for step in range(steps):
        res = trainer.forward_backward("r", cross_entropy_data(model.cfg.vocab_size, seed=step), "cross_entropy",
                                       {}, forward_only=False)
        out["logprobs"].append([o["logprobs"] for o in res.outputs])
        out["loss"].append(res.metrics["loss:sum"])
        grads = []
        for name, p in opt.params.items():  # summed copies: the run's own gradients stay for its step
            leaf = torch.zeros_like(p)
            leaf.grad = p.grad.clone()
            grads.append((name, leaf))
        if tp is not None:
            sync_replicated_grads(grads, tp, model.shard)
        out["grads"].append(_whole([(n, leaf.grad) for n, leaf in grads], tp, model.shard))
        out["grad_norm"].append(trainer.optim_step("r", hp)["grad_norm"])
    out["params"] = _whole(list(opt.params.items()), tp, model.shard)
    out["exp_avg"] = _whole(list(opt.exp_avg.items()), tp, model.shard)
    out["local_params"] = {n: p.detach().clone() for n, p in opt.params.items()}
    trainer.save("r", save_dir, with_optimizer=True, base_model="tiny")
    if tp is not None:
        import torch.distributed as dist

        dist.barrier(group=tp.group)  # rank 0 alone writes the checkpoint; the others read it next
    # the whole checkpoint read back on every rank, each keeping its pieces (weights and moments)
    trainer.load("again", save_dir, with_optimizer=True)
    again = trainer._runs["again"].optimizer  # noqa: SLF001
    out["reloaded_local"] = {n: (again.params[n].detach().clone(), again.exp_avg[n].clone(),
                                 again.exp_avg_sq[n].clone()) for n in again.params}
    out["local_state"] = {n: (opt.params[n].detach().clone(), opt.exp_avg[n].clone(), opt.exp_avg_sq[n].clone())
                          for n in opt.params}
    return out
