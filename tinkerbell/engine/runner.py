"""The fast path's model runner: one step's host-side plan → logits of the rows that sample or score.

Eager for any batch (paged Triton attention, gathered multi-LoRA, fused projections), and CUDA graphs for
decode-only batches: one graph per (batch-size bucket, with/without LoRA), captured on first use, replayed
with the step's inputs copied into static buffers. A batch is padded up to its bucket with rows that write
their K/V to the cache's scratch block and are sliced off the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tinkerbell.engine.batch import BatchContext, SeqSpan
from tinkerbell.engine.kernels.lora_sgmv import LoraTiles, max_tiles, plan_tiles
from tinkerbell.engine.kernels.paged_attention import PagedAttnMeta, meta_for_spans
from tinkerbell.engine.kv_cache import PagedKVCache
from tinkerbell.engine.lora_gathered import GatheredLora
from tinkerbell.engine.lora_slots import LoraSlots
from tinkerbell.engine.models.llama import CausalLM

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class StepPlan:
    """Host-side description of one forward (built by the sampler from its schedule)."""

    ids: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # KV-cache slot of every token
    spans: list[SeqSpan] = field(default_factory=list)
    token_lora: list[int] = field(default_factory=list)  # LoRA slot of every token (-1: none)
    gathered: list[int] = field(default_factory=list)  # rows whose logits are wanted
    gathered_lora: list[int] = field(default_factory=list)

    @property
    def decode_only(self) -> bool:
        """Every sequence contributes one token, and every token samples: the graph-captured case."""
        return len(self.ids) == len(self.spans) == len(self.gathered) and self.gathered == list(range(len(self.ids)))


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
        if self.cuda_graphs:
            self._alloc_static()

    # ------------------------------------------------------------------------------------------- eager

    def logits(self, plan: StepPlan) -> torch.Tensor:
        """float32 logits [len(plan.gathered), vocab]."""
        b = len(plan.ids)
        if self.cuda_graphs and plan.decode_only and b <= GRAPH_BUCKETS[-1]:
            return self._replay(plan)
        self.eager_steps += 1
        dev = self.device
        ctx = BatchContext(
            spans=plan.spans, kv_cache=self.kv,
            slot_mapping=torch.tensor(plan.slots, dtype=torch.long).to(dev, non_blocking=True),
            lora=self._lora_for(plan.token_lora), attn=meta_for_spans(plan.spans, dev),
            position_ids=torch.from_numpy(np.concatenate(
                [np.arange(s.cached_len, s.context_len) for s in plan.spans])).to(dev, non_blocking=True))
        ids = torch.tensor(plan.ids, dtype=torch.long).to(dev, non_blocking=True)
        hidden = self.model.hidden_states(ids, ctx)
        if plan.gathered != list(range(b)):
            hidden = hidden[torch.tensor(plan.gathered, dtype=torch.long).to(dev, non_blocking=True)]
        head = BatchContext(spans=[], lora=self._lora_for(plan.gathered_lora))
        return self.model.logits(hidden, head).float()

    def _lora_for(self, row_slots: list[int]) -> GatheredLora | None:
        if not any(s >= 0 for s in row_slots):
            return None
        return GatheredLora.for_rows(self.lora, row_slots, self.device)

    # ------------------------------------------------------------------------------------------- graphs

    def _alloc_static(self) -> None:
        n, dev = GRAPH_BUCKETS[-1], self.device
        width = -(-self.max_context // self.kv.block_size)
        # ids, positions, cache slots and context lengths of every row: one host→device copy per step.
        self._rowdata = torch.zeros(4, n, dtype=torch.long, device=dev)
        self._ids, self._pos, self._slot_map, self._tok_ctx = self._rowdata.unbind(0)
        # Padding rows read entry 0 of their table row (context 1) and discard the result, so any block id
        # works there: stale ids of earlier steps are fine and tables are never reset.
        self._tables = torch.zeros(n, width, dtype=torch.int32, device=dev)
        self._tok_seq = torch.arange(n, dtype=torch.int32, device=dev)
        self._rows = torch.zeros(n, dtype=torch.int32, device=dev)
        self._tiles = torch.zeros(3, max_tiles(n, max(self.lora.max_loras, 1)), dtype=torch.int32, device=dev)
        self._pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None

    def _pad(self) -> None:
        """Every static row a harmless padding row (scratch block, context 1, no adapter)."""
        self._rowdata.copy_(torch.from_numpy(self._host_rows([], [], [], [], GRAPH_BUCKETS[-1])))
        self._tiles.zero_()

    def _host_rows(self, ids: list[int], pos: list[int], slots: list[int], ctx: list[int], bucket: int) -> np.ndarray:
        b = len(ids)
        rows = np.empty((4, bucket), dtype=np.int64)
        rows[:, :b] = (ids, pos, slots, ctx)
        rows[:, b:] = np.array([0, 0, self.kv.scratch_block * self.kv.block_size, 1])[:, None]
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
        return self.model.logits(hidden, BatchContext(spans=[], lora=lora)).float()

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

    def _replay(self, plan: StepPlan) -> torch.Tensor:
        b = len(plan.ids)
        bucket = next(x for x in GRAPH_BUCKETS if x >= b)
        with_lora = any(s >= 0 for s in plan.token_lora)
        key = (bucket, with_lora)
        if key not in self._graphs:
            self._graphs[key] = self._capture(bucket, with_lora)
        width = max(len(s.block_table) for s in plan.spans)
        tables = np.zeros((b, width), dtype=np.int32)
        ctx = [s.context_len for s in plan.spans]
        for i, s in enumerate(plan.spans):
            tables[i, :len(s.block_table)] = s.block_table
        host = self._host_rows(plan.ids, [c - 1 for c in ctx], plan.slots, ctx, bucket)
        self._rowdata[:, :bucket].copy_(torch.from_numpy(host), non_blocking=True)
        self._tables[:b, :width].copy_(torch.from_numpy(tables), non_blocking=True)
        if with_lora:
            rows, tiles = plan_tiles(np.asarray(plan.token_lora), num_tiles=max_tiles(bucket, self.lora.max_loras))
            self._rows[:len(rows)].copy_(torch.from_numpy(rows), non_blocking=True)
            self._tiles[:, :tiles.shape[0]].copy_(torch.from_numpy(np.ascontiguousarray(tiles.T)), non_blocking=True)
        self.graph_steps += 1
        graph = self._graphs[key]
        if graph.graph is None:
            return self._body(bucket, with_lora)[:b]
        graph.graph.replay()
        return graph.logits[:b]
