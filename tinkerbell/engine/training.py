"""LoRA training on the shared, frozen base model: packed forward/backward, gradient accumulation, AdamW, and
checkpoints.

Each run owns fp32 master LoRA weights (leaf tensors whose `.grad` is its gradient accumulator) and its AdamW
moments. A forward/backward packs the datums of one or more runs into one variable-length batch with no
padding; each run's rows use its own adapter (one `LoraSegment` per run), so the engine hands several runs'
requests to `run_segments` at once. The batch runs in as few micro-batches as the measured memory plan allows
(training_memory.py), with layer checkpointing only where a micro-batch would not fit without it; gradients
accumulate across micro-batches as across calls. The forward is training_forward.py's (all sequences in one
attention call per layer on GPU, LoRA in the model's dtype). Logits are computed in row chunks; each chunk's
log-probabilities come from its bf16 logits by a fused kernel on GPU (kernels/train_ops.py). Where the memory plan
has room the chunks' logits are kept for the backward; otherwise each chunk runs under activation checkpointing,
so only one [chunk, vocab] block is alive at a time, in the forward and in the backward.
`optim_steps` steps many runs' AdamW in one fused update.

Tensor parallel (`tp`): each rank holds its pieces of every run's adapter and moments (engine/tp/shard.py) and
runs the same calls in the same order as the others (engine/tp/executor.py mirrors them). Log-probabilities are
vocab-parallel (a global max, a summed exp-sum and the target logit summed from the rank whose vocabulary range
holds it; full logits are never gathered). Replicated LoRA tensors get the sum of the ranks' partial gradients
in one all-reduce before each step. `save` gathers whole tensors to rank 0, which alone writes, so a checkpoint
is an ordinary PEFT adapter whatever the TP degree; `load` reads it whole and keeps this rank's pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from tinkerbell.engine.adapter_io import load_peft, save_peft
from tinkerbell.engine.batch import BatchContext
from tinkerbell.engine.lora import AdapterWeights, LoraSegment, LoraSpec, module_shape
from tinkerbell.engine.kernels.train_ops import target_logprobs
from tinkerbell.engine.losses import LossConfig, LossFn, flat_inputs, resolve, validate
from tinkerbell.engine.models.llama import CausalLM
from tinkerbell.engine.optimizer import AdamW, check_params, fused_step
from tinkerbell.engine.tp.group import TPGroup, reduce_from_tp
from tinkerbell.engine.tp.shard import gather_lora_tensors, norm_owner, shard_adapter, shard_lora_tensor, \
    sync_replicated_grads
from tinkerbell.engine.training_forward import PackedAttention, hidden_states, packed_positions
from tinkerbell.engine.training_lora import TrainLora
from tinkerbell.engine.training_memory import MIN_TRAINABLE_TOKENS, PASS_GRAD_BYTES, RESIDENT_STATE_BYTES, \
    RUN_STATE_BYTES, MemoryPlan, adapter_elements, plan_memory
from tinkerbell.engine.training_params import add_back_grads, assemble, ordered, pack, restore_grads, \
    set_aside_grads, views_like
from tinkerbell.engine.types import AdamParams, EngineCapacityError, EngineUserError, ForwardBackwardResult, \
    TrainDatum

OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# Elements of one [chunk, vocab] logits block: 32M floats = 128 MiB, ~220 rows at a 150k vocabulary.
DEFAULT_LOGITS_CHUNK_ELEMS = 2**25


@dataclass
class _Run:
    weights: AdapterWeights  # fp32 masters, requires_grad, views of one buffer (training_params.pack)
    optimizer: AdamW


@dataclass
class TrainSegment:
    """One run's validated request: its share of a packed forward/backward."""

    run_id: str
    data: list[TrainDatum]
    loss: LossFn
    config: LossConfig
    forward_only: bool


@dataclass
class _Targets:
    """Every (row, target id) pair of the packed batch, row-major, so [N] and [N, K] datums mix freely."""

    rows: np.ndarray  # int64, non-decreasing
    ids: np.ndarray  # int64
    # per datum (in segment order): its slice of the flat pairs and the shape of its target_tokens
    spans: list[tuple[int, int, tuple[int, ...]]]
    first_datum: np.ndarray  # per segment: index of its first datum
    datum_rows: np.ndarray  # per datum: its first row in the packed batch


def _named_params(w: AdapterWeights) -> dict[str, torch.Tensor]:
    """By optimizer name, in the packed buffer's order (every A, then every B)."""
    return {**{f"{k}.lora_A": t for k, t in w.a.items()}, **{f"{k}.lora_B": t for k, t in w.b.items()}}


def _frozen_view(w: AdapterWeights) -> AdapterWeights:
    """The same tensors cut from autograd, so a forward-only segment never touches its run's accumulator."""
    return assemble(w, [t.detach() for t in ordered(w)], None if w.flat is None else w.flat.detach())


class Trainer:
    def __init__(self, model: CausalLM, device: torch.device,
                 logits_chunk_elems: int = DEFAULT_LOGITS_CHUNK_ELEMS, checkpoint_layers: bool | None = None,
                 gpu_paths: bool | None = None, memory: MemoryPlan | None = None, tp: TPGroup | None = None):
        """`checkpoint_layers` None: by the memory plan; `gpu_paths` (None: on CUDA) turns on padded attention
        and the fused multi-adapter LoRA (training_lora.py) instead of per-sequence / per-segment loops;
        `memory`: a fixed plan instead of the measured one (tests); `tp`: the model's tensor-parallel group
        (default: `model.tp`)."""
        self.model = model
        self.cfg = model.cfg  # the full model's (validation, whole-adapter shapes)
        self.tp = tp if tp is not None else getattr(model, "tp", None)
        self.shard = getattr(model, "shard", None)
        if self.tp is not None and (self.shard is None or model.tp is not self.tp):
            raise ValueError("Trainer(tp=...) needs the model sharded over the same group (load_model(..., tp=tp))")
        self.device = torch.device(device)
        first = next(model.parameters())
        self.model_dtype, self.model_device = first.dtype, first.device
        # Under tp the chunking must be the same on every rank (each chunk runs collectives): size it by the
        # largest vocabulary share, which is rank 0's.
        self.local_vocab = self.shard.vocab_sizes[0] if self.shard is not None else self.cfg.vocab_size
        self.chunk_rows = max(1, logits_chunk_elems // self.local_vocab)
        self.checkpoint_layers = checkpoint_layers
        self.gpu_paths = gpu_paths
        self._memory = memory
        self._runs: dict[str, _Run] = {}
        self._element_counts: dict[LoraSpec, int] = {}
        self._counters = {"forward_backward_calls": 0, "optim_steps": 0, "tokens_trained": 0, "tokens_scored": 0}

    # ------------------------------------------------------------------------------------------- runs

    def _get(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise EngineUserError(f"unknown training run {run_id!r}")
        return run

    def _add(self, run_id: str, weights: AdapterWeights, optimizer: AdamW | None = None) -> None:
        """`weights` packed (training_params.pack), `optimizer` (if given) built on them."""
        if run_id in self._runs:
            raise EngineUserError(f"training run {run_id!r} already exists")
        assert weights.flat is not None, "a run's masters are packed in one buffer"
        optimizer = optimizer or AdamW.for_params(_named_params(weights), weights.flat)
        if self.shard is not None:
            optimizer.norm_owner = {k: norm_owner(k, self.shard, weights.spec.rank) for k in optimizer.params}
        self._runs[run_id] = _Run(weights=weights, optimizer=optimizer)

    def create(self, run_id: str, spec: LoraSpec, seed: int | None) -> None:
        if spec.rank < 1:
            raise EngineUserError(f"lora_config.rank must be >= 1, got {spec.rank}")
        if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
            raise EngineUserError("lora_config: at least one of train_attn, train_mlp, train_unembed must be true")
        if run_id in self._runs:  # before spending time on initialisation
            raise EngineUserError(f"training run {run_id!r} already exists")
        if self.shard is not None and seed is None:
            raise EngineUserError("a tensor-parallel trainer needs a seed for a new adapter (rank 0 draws one)")
        self._check_room(spec)
        self._add(run_id, pack(AdapterWeights.init(self.cfg, spec, seed, dtype=torch.float32, device=self.device,
                                                   shard=self.shard)))

    def remove(self, run_id: str) -> None:
        self._get(run_id)
        del self._runs[run_id]

    def has(self, run_id: str) -> bool:
        return run_id in self._runs

    def spec(self, run_id: str) -> LoraSpec:
        return self._get(run_id).weights.spec

    def snapshot(self, run_id: str) -> AdapterWeights:
        """A detached copy in the model's dtype (this rank's pieces under tp), for the sampler: views into one
        cast of the run's packed buffer, rather than an allocation, a cast and a copy per tensor (~450 launches
        for 1B at r32)."""
        w = self._get(run_id).weights
        assert w.flat is not None
        low = w.flat.detach().to(self.model_dtype, copy=True)
        return assemble(w, views_like(low, w.flat, ordered(w)))

    def stats(self) -> dict:
        return {"runs": len(self._runs), **self._counters}

    # ------------------------------------------------------------------------------------------- training

    def prepare(self, run_id: str, data: list[TrainDatum], loss_fn: str, loss_config: dict[str, float] | None,
                forward_only: bool) -> TrainSegment:
        """Check a request completely (run, loss, every datum) before any tensor is touched."""
        self._get(run_id)
        loss = resolve(loss_fn)
        config = LossConfig.parse(loss_config)
        validate(data, loss, self.cfg.vocab_size, self.cfg.max_position_embeddings)
        self._check_size(data, self.spec(run_id))
        return TrainSegment(run_id, data, loss, config, forward_only)

    def _check_size(self, data: list[TrainDatum], spec: LoraSpec) -> None:
        """Refuse what memory cannot hold (a 4xx that names the limit) instead of running out of it."""
        plan = self._plan_with([spec])
        longest = max(len(d.tokens) for d in data)
        if longest > plan.max_sequence_tokens:
            raise EngineUserError(
                f"a datum has {longest} tokens; this server's training memory holds at most "
                f"{plan.max_sequence_tokens} tokens per datum")
        total = sum(len(d.tokens) for d in data)
        if total > plan.max_request_tokens:
            raise EngineUserError(
                f"the request has {total} tokens; at most {plan.max_request_tokens} tokens per forward_backward "
                "request on this server: split it into several requests (gradients accumulate until optim_step)")

    def forward_backward(self, run_id: str, data: list[TrainDatum], loss_fn: str, loss_config: dict[str, float],
                         forward_only: bool) -> ForwardBackwardResult:
        return self.run_segments([self.prepare(run_id, data, loss_fn, loss_config, forward_only)])[0]

    def run_segments(self, segments: list[TrainSegment]) -> list[ForwardBackwardResult]:
        """One packed forward (and backward, unless every segment is forward-only) over all segments' datums,
        split into as few micro-batches as memory allows; each training segment's gradient is added to its
        run's accumulator. Results come back per segment."""
        runs = [self._get(s.run_id) for s in segments]
        views = [_frozen_view(r.weights) if s.forward_only else r.weights for s, r in zip(segments, runs)]
        targets = self._targets(segments)
        plan = self._plan_with([r.weights.spec for r in {id(r): r for r in runs}.values()])
        total = sum(len(d.tokens) for s in segments for d in s.data)
        cap, checkpointed = plan.microbatch_tokens(total)
        if self.checkpoint_layers is not None:
            checkpointed = self.checkpoint_layers
        # Keep each logits chunk for the backward (instead of rebuilding it: one LM-head matmul less) where the
        # budget holds them all. Not under tp: there the rebuild runs collectives, and ranks could disagree.
        rows = min(total, cap)
        keep_logits = (self._gpu_paths(self.model_device) and (self.tp is None or self.tp.world == 1)
                       and plan.spare_bytes(rows, checkpointed) >= rows * self.local_vocab * self.model_dtype.itemsize)
        lp_parts, loss_parts = [], []
        # The pass accumulates into fresh gradients; the runs' earlier ones (requests since their last optim_step)
        # are added back only once it succeeded, so a pass that fails midway leaves every run as it was.
        earlier = set_aside_grads([r.weights for s, r in zip(segments, runs) if not s.forward_only])
        try:
            for items in _split(segments, cap):
                lp, loss = self._micro_batch(segments, views, targets, items, checkpointed, keep_logits)
                lp_parts.append(lp)
                loss_parts.append(loss)
        except BaseException as e:
            restore_grads(earlier)
            if isinstance(e, OUT_OF_MEMORY):
                if self.model_device.type == "cuda":
                    torch.cuda.empty_cache()  # what the failed pass fragmented, back for the next one
                raise EngineCapacityError(
                    f"the GPU ran out of memory in a forward_backward pass of {total} tokens ({len(segments)} "
                    f"requests, micro-batches of up to {cap} tokens); the runs' gradients are as they were before "
                    "it. Retry with fewer tokens per request; if it persists, restart the server with a lower "
                    "--gpu-memory-util (more memory for training)") from e
            raise
        add_back_grads(earlier)
        # One device-to-host copy per micro-batch, then split per datum and per segment on the host.
        lp_host = np.concatenate(lp_parts) if lp_parts else np.zeros(0, np.float32)
        loss_host = np.concatenate(loss_parts) if loss_parts else np.zeros(0, np.float32)
        results, span_iter = [], iter(targets.spans)
        for seg in segments:
            outputs, loss_sum = [], 0.0
            for _ in seg.data:
                lo, hi, shape = next(span_iter)
                outputs.append({"logprobs": lp_host[lo:hi].reshape(shape),
                                "elementwise_loss": loss_host[lo:hi].reshape(shape)})
                loss_sum += float(loss_host[lo:hi].sum(dtype=np.float64))
            ntokens = sum(len(d.tokens) for d in seg.data)
            results.append(ForwardBackwardResult(outputs, {"loss:sum": loss_sum, "ntokens:sum": float(ntokens)}))
            self._counters["tokens_scored"] += ntokens
            if not seg.forward_only:
                self._counters["tokens_trained"] += ntokens
        self._counters["forward_backward_calls"] += len(segments)
        return results

    def _micro_batch(self, segments: list[TrainSegment], views: list[AdapterWeights], targets: _Targets,
                     items: list[tuple[int, int, int]], checkpointed: bool,
                     keep_logits: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Forward (and backward) of datums `items` ((segment, first datum, end datum), in batch order); returns
        their flat logprobs and elementwise losses on the host."""
        dev = self.model_device
        data = [d for i, d0, d1 in items for d in segments[i].data[d0:d1]]
        lengths = [len(d.tokens) for d in data]
        ids = torch.from_numpy(np.concatenate([np.asarray(d.tokens, dtype=np.int64) for d in data])).to(dev)
        lora_segments, row = [], 0
        for i, d0, d1 in items:
            n = sum(len(d.tokens) for d in segments[i].data[d0:d1])
            prev = lora_segments[-1] if lora_segments else None
            if prev is not None and prev.weights is views[i] and prev.end == row:
                prev.end += n  # the same run's consecutive requests share one LoRA matmul
            else:
                lora_segments.append(LoraSegment(row, row + n, views[i]))
            row += n
        gpu = self._gpu_paths(dev)
        ctx = BatchContext(spans=[], lora=TrainLora(lora_segments, fused=gpu),
                           position_ids=packed_positions(lengths, dev))
        attend = PackedAttention(lengths, dev, padded=gpu)
        # this micro-batch's (row, id) pairs: a contiguous range of the batch's, shifted to its first row
        first_datum = int(targets.first_datum[items[0][0]]) + items[0][1]
        last_datum = int(targets.first_datum[items[-1][0]]) + items[-1][2] - 1
        p0, p1 = targets.spans[first_datum][0], targets.spans[last_datum][1]
        local = _Targets(targets.rows[p0:p1] - int(targets.datum_rows[first_datum]), targets.ids[p0:p1], [],
                         targets.first_datum, targets.datum_rows)
        need_grad = not all(segments[i].forward_only for i, _, _ in items)

        with torch.set_grad_enabled(need_grad):
            hidden = hidden_states(self.model, ids, ctx, attend, need_grad and checkpointed)
            lp_flat = self._target_logprobs(hidden, ctx, local, rebuild=not keep_logits)
            losses, to_backprop, at = [], [], 0
            # Consecutive requests with the same loss, config and mode share one loss computation (its inputs in
            # one copy each): a batch of many runs' cross-entropy requests is one loss, not one per run.
            for (loss, config, forward_only), parts in groupby(
                    items, key=lambda it: (segments[it[0]].loss, segments[it[0]].config, segments[it[0]].forward_only)):
                data = [d for i, d0, d1 in parts for d in segments[i].data[d0:d1]]
                sizes = [int(np.asarray(d.inputs["target_tokens"]).size) for d in data]
                lp = lp_flat[at:at + sum(sizes)]
                at += sum(sizes)
                group = None
                if len(sizes) > 1:  # each datum is its own group for sequence-level losses
                    group = torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes)).to(dev, non_blocking=True)
                elementwise = loss.compute(lp, flat_inputs(data, loss, config, lp.device), config, group)
                losses.append(elementwise.detach())
                if not forward_only:
                    to_backprop.append(elementwise.sum())
            if to_backprop:
                torch.stack(to_backprop).sum().backward()
        return lp_flat.detach().float().cpu().numpy(), torch.cat(losses).float().cpu().numpy()

    def _gpu_paths(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.gpu_paths is None else self.gpu_paths

    def memory_plan(self) -> MemoryPlan:
        """Measured once, on first use: by then the sampler's KV cache holds its share of the GPU. Before the
        runs' state is charged (`_plan_with`)."""
        if self._memory is None:
            self._memory = plan_memory(self.model, self.chunk_rows * self.local_vocab,
                                       RESIDENT_STATE_BYTES * self._runs_elements())
        return self._memory

    def _elements(self, spec: LoraSpec) -> int:
        """Cached per spec: counting walks every target module (~0.16 ms for 1B), and every request's memory
        check sums over all runs."""
        n = self._element_counts.get(spec)
        if n is None:
            world = self.tp.world if self.tp is not None else 1
            n = self._element_counts[spec] = adapter_elements(self.cfg, spec, world)
        return n

    def _runs_elements(self) -> int:
        return sum(self._elements(r.weights.spec) for r in self._runs.values())

    def _plan_with(self, batch: list[LoraSpec], new: LoraSpec | None = None) -> MemoryPlan:
        """The memory plan less every run's training state (and `new`'s, a run about to be created) and what a
        batch of the runs `batch` adds: each adapter's model-dtype copy and the pass's own gradients."""
        state = RUN_STATE_BYTES * (self._runs_elements() + (self._elements(new) if new is not None else 0))
        copies = sum((self.model_dtype.itemsize + PASS_GRAD_BYTES) * self._elements(s) for s in batch)
        return self.memory_plan().after_state(state + copies)

    def _check_room(self, spec: LoraSpec) -> None:
        """Refuse a new run whose state would leave training too little memory (a 4xx, not an OOM later)."""
        plan = self._plan_with([spec], new=spec)
        if plan.state_at_plan is None or plan.max_tokens(checkpointed=True) >= MIN_TRAINABLE_TOKENS:
            return  # a fixed plan charges no run state
        mib = RUN_STATE_BYTES * self._elements(spec) / 2**20
        held = RUN_STATE_BYTES * self._runs_elements() / 2**30
        raise EngineUserError(
            f"no training memory left for another LoRA adapter of rank {spec.rank} ({mib:.0f} MiB of fp32 weights, "
            f"AdamW moments and gradients): the {len(self._runs)} runs on this server hold {held:.1f} GiB, and with "
            f"one more a micro-batch could not hold {MIN_TRAINABLE_TOKENS} tokens. End runs you no longer train, "
            "use a lower rank, or restart the server with a lower --gpu-memory-util (more memory for training)")

    def _targets(self, segments: list[TrainSegment]) -> _Targets:
        rows, ids, spans = [], [], []
        offset = flat = 0
        for seg in segments:
            for d in seg.data:
                t = np.asarray(d.inputs["target_tokens"], dtype=np.int64)
                n, k = len(d.tokens), (1 if t.ndim == 1 else t.shape[1])
                rows.append(np.repeat(np.arange(offset, offset + n, dtype=np.int64), k))
                ids.append(t.reshape(-1))
                spans.append((flat, flat + n * k, tuple(t.shape)))
                offset, flat = offset + n, flat + n * k
        first_datum = np.cumsum([0] + [len(s.data) for s in segments])
        datum_rows = np.cumsum([0] + [len(d.tokens) for s in segments for d in s.data])
        return _Targets(np.concatenate(rows), np.concatenate(ids), spans, first_datum, datum_rows)

    def _target_logprobs(self, hidden: torch.Tensor, ctx: BatchContext, targets: _Targets,
                         rebuild: bool = True) -> torch.Tensor:
        """log_softmax(logits)[row, id] for every target pair, [chunk, vocab] logits at a time. With autograd on
        and `rebuild`, each chunk runs under checkpointing: only its hidden rows are kept, its logits are rebuilt
        in backward; without, autograd keeps each chunk's logits (model dtype) until the backward."""
        total_rows = hidden.shape[0]
        starts = np.arange(0, total_rows, self.chunk_rows)
        bounds = np.searchsorted(targets.rows, np.append(starts, total_rows))
        rows = torch.from_numpy(targets.rows).to(hidden.device, non_blocking=True)
        ids = torch.from_numpy(targets.ids).to(hidden.device, non_blocking=True)
        pieces = []
        for i, r0 in enumerate(starts.tolist()):
            r1 = min(r0 + self.chunk_rows, total_rows)
            a, b = int(bounds[i]), int(bounds[i + 1])
            args = (hidden[r0:r1], ctx, r0, rows[a:b] - r0, ids[a:b])
            if torch.is_grad_enabled() and rebuild:
                pieces.append(checkpoint(self._chunk_logprobs, *args, use_reentrant=False))
            else:
                pieces.append(self._chunk_logprobs(*args))
        return torch.cat(pieces)

    def _chunk_logprobs(self, hidden: torch.Tensor, ctx: BatchContext, row_offset: int, local_rows: torch.Tensor,
                        ids: torch.Tensor) -> torch.Tensor:
        if self.tp is not None and self.tp.world > 1:  # one rank's logits are the whole vocabulary
            return self._chunk_logprobs_tp(hidden, ctx, row_offset, local_rows, ids)
        return target_logprobs(self.model.logits(hidden, ctx, row_offset=row_offset), local_rows, ids)

    def _chunk_logprobs_tp(self, hidden: torch.Tensor, ctx: BatchContext, row_offset: int,
                           local_rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel log-softmax: each rank holds logits of its vocabulary range only. The max is a
        detached all-reduce (it cancels out of the gradient); the exp-sums and the target logits (non-zero on
        the one rank whose range holds the id) are summed with `reduce_from_tp`, whose backward leaves each
        rank the gradient of its own columns."""
        assert self.shard is not None and self.tp is not None
        logits = self.model.local_logits(hidden, ctx, row_offset=row_offset).float()
        with torch.no_grad():
            top = logits.max(dim=-1).values
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.tp.group)
        sumexp = reduce_from_tp((logits - top[:, None]).exp().sum(dim=-1), self.tp)
        lse = sumexp.log() + top
        local_ids = ids - self.shard.vocab_start
        mine = (local_ids >= 0) & (local_ids < self.shard.vocab_size)
        picked = logits[local_rows, local_ids.clamp(0, self.shard.vocab_size - 1)]
        target = reduce_from_tp(torch.where(mine, picked, torch.zeros_like(picked)), self.tp)
        return target - lse[local_rows]

    def optim_step(self, run_id: str, params: AdamParams) -> dict[str, float]:
        out = self.optim_steps([(run_id, params)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def optim_steps(self, steps: list[tuple[str, AdamParams]]) -> list[dict[str, float] | EngineUserError]:
        """AdamW steps of many runs in one fused update (each with its own hyper-parameters); a refused step
        (unknown run, bad parameters, non-finite gradient) is returned as its error and the others proceed.
        A run named twice steps twice, in order."""
        results: list[dict[str, float] | EngineUserError | None] = [None] * len(steps)
        pending = list(range(len(steps)))
        while pending:
            batch, seen, later = [], set(), []
            for i in pending:
                run_id = steps[i][0]
                if run_id in seen:
                    later.append(i)
                    continue
                try:
                    self._get(run_id)
                except EngineUserError as e:
                    results[i] = e
                    continue
                seen.add(run_id)
                batch.append(i)
            if self.tp is not None:
                self._sync_grads(batch, steps)
            outs = fused_step([self._runs[steps[i][0]].optimizer for i in batch], [steps[i][1] for i in batch],
                              tp=self.tp)
            for i, out in zip(batch, outs):
                results[i] = out
                if not isinstance(out, Exception):
                    self._counters["optim_steps"] += 1
            pending = later
        return results  # type: ignore[return-value]

    def _sync_grads(self, batch: list[int], steps: list[tuple[str, AdamParams]]) -> None:
        """Sum the replicated LoRA tensors' partial gradients over the ranks, for the runs that will step (a
        step refused for its parameters keeps its gradients, which must not be summed twice)."""
        params: list[tuple[str, torch.Tensor]] = []
        for i in batch:
            try:
                check_params(steps[i][1])
            except EngineUserError:
                continue
            params += list(self._runs[steps[i][0]].optimizer.params.items())
        assert self.tp is not None and self.shard is not None
        sync_replicated_grads(params, self.tp, self.shard)

    # ------------------------------------------------------------------------------------------- checkpoints

    def save(self, run_id: str, out_dir: Path, with_optimizer: bool, base_model: str) -> int:
        """Write the run's adapter (and optimizer state) as whole tensors. Under tp every rank calls it, the
        pieces are gathered to rank 0 and only rank 0 writes (the others return 0)."""
        run = self._get(run_id)
        if self.tp is not None:
            return self._save_tp(run, out_dir, with_optimizer, base_model)
        written = save_peft(run.weights, out_dir, base_model)
        if with_optimizer:
            written += run.optimizer.save(out_dir)
        return written

    def _save_tp(self, run: _Run, out_dir: Path, with_optimizer: bool, base_model: str) -> int:
        assert self.tp is not None and self.shard is not None
        opt = run.optimizer
        names = list(opt.params)
        items = [(k, opt.params[k]) for k in names]
        if with_optimizer:
            items += [(k, opt.exp_avg[k]) for k in names] + [(k, opt.exp_avg_sq[k]) for k in names]
        whole = gather_lora_tensors(items, self.tp, self.shard)
        if whole is None:
            return 0
        n = len(names)
        keys = list(run.weights.a)
        full = dict(zip(names, whole[:n]))
        weights = AdapterWeights(spec=run.weights.spec, a={k: full[f"{k}.lora_A"] for k in keys},
                                 b={k: full[f"{k}.lora_B"] for k in keys})
        written = save_peft(weights, out_dir, base_model)
        if with_optimizer:
            state = AdamW(params=full, exp_avg=dict(zip(names, whole[n:2 * n])),
                          exp_avg_sq=dict(zip(names, whole[2 * n:])), step_count=opt.step_count)
            written += state.save(out_dir)
        return written

    def load(self, run_id: str, src_dir: Path, with_optimizer: bool) -> LoraSpec:
        if run_id in self._runs:
            raise EngineUserError(f"training run {run_id!r} already exists")
        try:
            weights = load_peft(src_dir, self.cfg, dtype=torch.float32, device=self.device)
        except FileNotFoundError:
            raise EngineUserError("the checkpoint holds no adapter (adapter_config.json / "
                                  "adapter_model.safetensors missing)") from None
        except (ValueError, KeyError):
            raise EngineUserError("the checkpoint's adapter is unreadable or does not fit this base model "
                                  "(a target module's LoRA weights are missing)") from None
        self._check_shapes(weights)
        self._check_room(weights.spec)
        reshard = None
        if self.shard is not None:  # every rank reads the whole adapter and keeps its pieces
            shard = self.shard
            weights = shard_adapter(weights, shard)

            def reshard(name: str, t: torch.Tensor) -> torch.Tensor:
                try:
                    return shard_lora_tensor(name, t, shard)
                except ValueError as e:
                    raise EngineUserError(f"the checkpoint's optimizer state does not fit its adapter: {e}") from None
        weights = pack(weights)
        optimizer = AdamW.for_params(_named_params(weights), weights.flat)
        if with_optimizer:
            optimizer.load(src_dir, reshard=reshard)
        self._add(run_id, weights, optimizer)
        return weights.spec

    def _check_shapes(self, w: AdapterWeights) -> None:
        r = w.spec.rank
        for key in w.a:
            fan_in, fan_out = module_shape(self.cfg, key)
            if tuple(w.a[key].shape) != (r, fan_in) or tuple(w.b[key].shape) != (fan_out, r):
                raise EngineUserError(
                    f"the checkpoint's adapter does not fit this base model: {key} has LoRA shapes "
                    f"{list(w.a[key].shape)} / {list(w.b[key].shape)}, want {[r, fan_in]} / {[fan_out, r]}"
                )


def _split(segments: list[TrainSegment], cap: int) -> list[list[tuple[int, int, int]]]:
    """Cut the batch, in order and at datum boundaries, into micro-batches of at most `cap` tokens (a longer
    datum, which `_check_size` allowed, goes alone). Each is a list of (segment, first datum, end datum)."""
    out: list[list[tuple[int, int, int]]] = []
    cur: list[tuple[int, int, int]] = []
    tokens = 0
    for i, seg in enumerate(segments):
        d0 = 0
        for j, d in enumerate(seg.data):
            n = len(d.tokens)
            if tokens > 0 and tokens + n > cap:
                if j > d0:
                    cur.append((i, d0, j))
                out.append(cur)
                cur, tokens, d0 = [], 0, j
            tokens += n
        cur.append((i, d0, len(seg.data)))
    if cur:
        out.append(cur)
    return out
