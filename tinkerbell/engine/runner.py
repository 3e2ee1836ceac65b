"""The fast path's model runner: one step's host-side plan → logits of the rows that sample or score.

Eager for any batch (paged Triton attention, gathered multi-LoRA, fused projections), and CUDA graphs for
decode-only batches: one graph per (batch-size bucket, with/without LoRA), captured on first use, replayed
with the step's inputs copied into static buffers. A batch is padded up to its bucket with rows that write
their K/V to the cache's scratch block and are sliced off the logits.

A decode step of the asynchronous loop (sampler_async.py) comes as arrays (`DecodeRows`) instead of lists:
its input ids are the previous step's samples, still on the device, copied into the graph's id buffer by
the GPU; its block tables are a host mirror kept across steps and uploaded only when they changed. Host
arrays go to the device through pinned memory, so launching a step never waits for the GPU.

Each captured graph also samples every row (kernels/gumbel_sample.sample_rows_logprob: token, its raw
logprob, the logsumexp, from one pass over the logits) into static buffers, from per-row temperatures and
noise keys uploaded with the step's row data. A decode step whose rows carry those inputs (`sample_decode`)
therefore ends inside the graph: no logits copy, no separate logsumexp, gather or sampling launches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tinkerbell.engine.batch import BatchContext, SeqSpan
from tinkerbell.engine.kernels.gumbel_sample import sample_rows_logprob
from tinkerbell.engine.kernels.lora_sgmv import LoraTiles, max_tiles, plan_tiles
from tinkerbell.engine.kernels.paged_attention import PagedAttnMeta, meta_for_spans
from tinkerbell.engine.kv_cache import PagedKVCache
from tinkerbell.engine.lora_gathered import GatheredLora
from tinkerbell.engine.lora_slots import LoraSlots
from tinkerbell.engine.models.llama import CausalLM

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class DecodeRows:
    """A decode-only step as arrays, one row per sequence (the asynchronous loop's plan)."""

    ids: torch.Tensor  # int64 [b] input tokens on the model's device (sampled by the previous step)
    pos: np.ndarray  # int64 [b] position of each input token (its context is pos + 1)
    slots: np.ndarray  # int64 [b] KV-cache slot each row writes
    tables: np.ndarray  # int32 [b, width] block tables (a host mirror kept across steps)
    tables_version: int  # changes whenever `tables` does: an unchanged table is not uploaded again
    lora: np.ndarray  # int64 [b] LoRA slot of each row (-1: none)
    # Sampling inside the graph (`ModelRunner.sample_decode`): each row's noise key (gumbel_sample.row_keys of
    # its seed and the position it draws for) and temperature (0: greedy). None: the caller samples itself.
    keys: np.ndarray | None = None  # int64 [b]
    temps: np.ndarray | None = None  # float32 [b]; the same array object while the rows' params are unchanged

    def __len__(self) -> int:
        return len(self.pos)


@dataclass
class StepPlan:
    """Host-side description of one forward (built by the sampler from its schedule)."""

    ids: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # KV-cache slot of every token
    spans: list[SeqSpan] = field(default_factory=list)
    token_lora: list[int] = field(default_factory=list)  # LoRA slot of every token (-1: none)
    gathered: list[int] = field(default_factory=list)  # rows whose logits are wanted
    gathered_lora: list[int] = field(default_factory=list)
    rows: DecodeRows | None = None  # set instead of the lists above by the asynchronous decode loop

    @property
    def decode_only(self) -> bool:
        """Every sequence contributes one token, and every token samples: the graph-captured case."""
        if self.rows is not None:
            return True
        return len(self.ids) == len(self.spans) == len(self.gathered) and self.gathered == list(range(len(self.ids)))

    def ids_tensor(self, device: torch.device) -> torch.Tensor:
        if self.rows is not None:
            return self.rows.ids
        return torch.tensor(self.ids, dtype=torch.long).to(device, non_blocking=True)

    def materialize(self) -> "StepPlan":
        """The list form of an array plan (for the eager and reference paths; ids stay on the device)."""
        r = self.rows
        if r is None or self.spans:
            return self
        b = len(r)
        lora = r.lora.tolist()
        self.ids = [0] * b  # placeholders: `ids_tensor` gives the real ones
        self.slots = r.slots.tolist()
        # Whole mirror rows as tables: entries past a row's context are never read.
        self.spans = [SeqSpan(start=i, length=1, context_len=p + 1, block_table=t)
                      for i, (p, t) in enumerate(zip(r.pos.tolist(), r.tables.tolist()))]
        self.token_lora = self.gathered_lora = lora
        self.gathered = list(range(b))
        return self


@dataclass
class Sampled:
    """A decode step sampled inside the graph: views of the runner's static buffers, valid until the next
    step is launched (read them, or copy them, on the same stream before that)."""

    tokens: torch.Tensor  # int64 [b]
    both: torch.Tensor  # float64 [2, b]: token ids and their raw logprobs (one device→host copy)
    lse: torch.Tensor  # float32 [b]: logsumexp of each row's logits
    logits: torch.Tensor  # [b, vocab] in the model's dtype (top-k logprobs read them)


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph | None, logits: torch.Tensor | None):
        self.graph, self.logits = graph, logits


class ModelRunner:
    def __init__(self, model: CausalLM, kv: PagedKVCache, lora: LoraSlots, device: torch.device,
                 max_context: int, cuda_graphs: bool):
        self.model, self.kv, self.lora, self.device = model, kv, lora, device
        # On the CPU the "graph" path runs its body eagerly from the same static buffers: tests cover the
        # buffer handling (padding, tables, LoRA tiles) without a GPU.
        self.cuda_graphs = cuda_graphs
        self.max_context = max_context
        self._graphs: dict[tuple[int, bool], _Graph] = {}
        self.graph_steps = self.eager_steps = 0
        self._tables_version: int | None = None  # DecodeRows.tables_version now in the static tables
        model.cache_rope(max_context, next(model.parameters()).dtype)
        if self.cuda_graphs:
            self._alloc_static()

    # ------------------------------------------------------------------------------------------- eager

    def logits(self, plan: StepPlan) -> torch.Tensor:
        """float32 logits [len(plan.gathered), vocab] (one row per sequence for an array plan)."""
        b = len(plan.rows) if plan.rows is not None else len(plan.ids)
        if self.cuda_graphs and plan.decode_only and b <= GRAPH_BUCKETS[-1]:
            return self._replay(plan).float()
        plan.materialize()
        self.eager_steps += 1
        dev = self.device
        ctx = BatchContext(
            spans=plan.spans, kv_cache=self.kv,
            slot_mapping=torch.tensor(plan.slots, dtype=torch.long).to(dev, non_blocking=True),
            lora=self._lora_for(plan.token_lora), attn=meta_for_spans(plan.spans, dev),
            position_ids=torch.from_numpy(np.concatenate(
                [np.arange(s.cached_len, s.context_len) for s in plan.spans])).to(dev, non_blocking=True))
        hidden = self.model.hidden_states(plan.ids_tensor(dev), ctx)
        if plan.gathered != list(range(b)):
            hidden = hidden[torch.tensor(plan.gathered, dtype=torch.long).to(dev, non_blocking=True)]
        head = BatchContext(spans=[], lora=self._lora_for(plan.gathered_lora))
        return self.model.logits(hidden, head).float()

    def samples(self, plan: StepPlan) -> bool:
        """Whether `sample_decode` runs this plan: an array plan whose rows carry their sampling inputs, within
        the largest graph bucket."""
        rows = plan.rows
        return (rows is not None and rows.keys is not None and rows.temps is not None and self.cuda_graphs
                and len(rows) <= GRAPH_BUCKETS[-1])

    def sample_decode(self, plan: StepPlan) -> Sampled:
        """One graph replay that runs the forward and samples every row (see `samples`)."""
        assert plan.rows is not None and self.samples(plan)
        b = len(plan.rows)
        logits = self._replay(plan)
        return Sampled(self._tok[:b], self._both[:, :b], self._lse[:b], logits)

    def _lora_for(self, row_slots: list[int]) -> GatheredLora | None:
        if not any(s >= 0 for s in row_slots):
            return None
        return GatheredLora.for_rows(self.lora, row_slots, self.device)

    # ------------------------------------------------------------------------------------------- graphs

    def _alloc_static(self) -> None:
        n, dev = GRAPH_BUCKETS[-1], self.device
        width = -(-self.max_context // self.kv.block_size)
        # ids, positions, cache slots, context lengths and noise keys of every row: one host→device copy a step.
        self._rowdata = torch.zeros(5, n, dtype=torch.long, device=dev)
        self._ids, self._pos, self._slot_map, self._tok_ctx, self._keys = self._rowdata.unbind(0)
        self._temps = torch.zeros(n, dtype=torch.float32, device=dev)
        self._temps_src: np.ndarray | None = None  # the host array now in _temps (uploaded when it changes)
        # What the graph's sampling writes: token, [token; logprob] and logsumexp of every row.
        self._tok = torch.zeros(n, dtype=torch.long, device=dev)
        self._both = torch.zeros(2, n, dtype=torch.float64, device=dev)
        self._lse = torch.zeros(n, dtype=torch.float32, device=dev)
        # Padding rows read entry 0 of their table row (context 1) and discard the result, so any block id
        # works there: stale ids of earlier steps are fine and tables are never reset.
        self._tables = torch.zeros(n, width, dtype=torch.int32, device=dev)
        self._tok_seq = torch.arange(n, dtype=torch.int32, device=dev)
        self._rows = torch.zeros(n, dtype=torch.int32, device=dev)
        self._tiles = torch.zeros(3, max_tiles(n, max(self.lora.max_loras, 1)), dtype=torch.int32, device=dev)
        self._pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None

    def _pad(self) -> None:
        """Every static row a harmless padding row (scratch block, context 1, no adapter)."""
        self._rowdata.copy_(torch.from_numpy(self._host_rows([], [], [], [], [], GRAPH_BUCKETS[-1])))
        self._tiles.zero_()

    def _host_rows(self, ids: list[int] | np.ndarray, pos: list[int] | np.ndarray, slots: list[int] | np.ndarray,
                   ctx: list[int] | np.ndarray, keys: list[int] | np.ndarray, bucket: int) -> np.ndarray:
        b = len(ids)
        rows = np.empty((5, bucket), dtype=np.int64)
        rows[:4, :b] = (ids, pos, slots, ctx)
        rows[4, :b] = keys if len(keys) else 0
        rows[:, b:] = np.array([0, 0, self.kv.scratch_block * self.kv.block_size, 1, 0])[:, None]
        return rows

    def _body(self, bucket: int, with_lora: bool) -> torch.Tensor:
        nt = max_tiles(bucket, max(self.lora.max_loras, 1))
        lora = None
        if with_lora:
            tiles = LoraTiles(rows=self._rows[:bucket], tile_slot=self._tiles[0, :nt], tile_start=self._tiles[1, :nt],
                              tile_len=self._tiles[2, :nt])
            lora = GatheredLora(self.lora, tiles)
        ctx = BatchContext(spans=[], kv_cache=self.kv, slot_mapping=self._slot_map[:bucket], lora=lora,
                           attn=PagedAttnMeta(self._tables[:bucket], self._tok_seq[:bucket], self._tok_ctx[:bucket],
                                              max_ctx=self.max_context),
                           position_ids=self._pos[:bucket])
        hidden = self.model.hidden_states(self._ids[:bucket], ctx)
        logits = self.model.logits(hidden, BatchContext(spans=[], lora=lora))
        sample_rows_logprob(logits, self._temps[:bucket], self._keys[:bucket],
                            (self._tok[:bucket], self._both[:, :bucket], self._lse[:bucket]))
        return logits

    def _capture(self, bucket: int, with_lora: bool) -> _Graph:
        if self.device.type != "cuda":
            return _Graph(None, None)
        self._pad()
        self._body(bucket, with_lora)  # compiles the kernels and warms the allocator outside the capture
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._body(bucket, with_lora)
        return _Graph(graph, out)

    def _upload(self, dst: torch.Tensor, host: np.ndarray) -> None:
        """Host array → static buffer without waiting for the GPU: a non-blocking copy from pinned memory
        (torch's pinned allocator keeps the block until the copy has run, so the array may change at once)."""
        src = torch.from_numpy(host)
        if dst.is_cuda:
            src = src.pin_memory()
        dst.copy_(src, non_blocking=True)

    def _replay(self, plan: StepPlan) -> torch.Tensor:
        rows = plan.rows
        b = len(rows) if rows is not None else len(plan.ids)
        bucket = next(x for x in GRAPH_BUCKETS if x >= b)
        row_lora = rows.lora if rows is not None else np.asarray(plan.token_lora, dtype=np.int64)
        with_lora = bool((row_lora >= 0).any())
        key = (bucket, with_lora)
        if key not in self._graphs:
            self._graphs[key] = self._capture(bucket, with_lora)
        if rows is None:
            width = max(len(s.block_table) for s in plan.spans)
            tables = np.zeros((b, width), dtype=np.int32)
            ctx = [s.context_len for s in plan.spans]
            for i, s in enumerate(plan.spans):
                tables[i, :len(s.block_table)] = s.block_table
            self._upload(self._rowdata[:, :bucket], self._host_rows(plan.ids, [c - 1 for c in ctx], plan.slots, ctx,
                                                                    [], bucket))
            self._upload(self._tables[:b, :width], tables)
            self._tables_version = None
        else:
            keys = rows.keys if rows.keys is not None else []
            host = self._host_rows(np.zeros(b, dtype=np.int64), rows.pos, rows.slots, rows.pos + 1, keys, bucket)
            self._upload(self._rowdata[:, :bucket], host)
            if rows.temps is not None and rows.temps is not self._temps_src:
                self._upload(self._temps[:b], rows.temps)
                self._temps_src = rows.temps
            self._ids[:b].copy_(rows.ids)  # device to device, after the row data: the sampled tokens go in
            if rows.tables_version != self._tables_version:
                self._upload(self._tables[:b, :rows.tables.shape[1]], rows.tables)
                self._tables_version = rows.tables_version
        if with_lora:
            lrows, tiles = plan_tiles(row_lora, num_tiles=max_tiles(bucket, self.lora.max_loras))
            self._upload(self._rows[:len(lrows)], lrows)
            self._upload(self._tiles[:, :tiles.shape[0]], np.ascontiguousarray(tiles.T))
        self.graph_steps += 1
        graph = self._graphs[key]
        if graph.graph is None:
            return self._body(bucket, with_lora)[:b]
        graph.graph.replay()
        return graph.logits[:b]
