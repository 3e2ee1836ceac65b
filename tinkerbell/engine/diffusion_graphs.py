"""CUDA graphs for the diffusion sampler's forwards (LLaDA), on by default on CUDA.

A LLaDA forward is ~300 kernels (~9 a layer after models/llada.py's fusions; it was ~1,750 ops before them);
launched one by one from Python they still take longer than the GPU needs for a 32-token block step at batch 1,
so the step would be bound by the CPU. Within a block every step of a batch has the same shapes (the same rows,
the same cached context), so one graph captured on the second sight of a shape replays the remaining steps in
one launch.

Only forwards that return no keys/values are graphed (cache-building steps run eagerly: they are 1 in
steps-per-block). A graph owns static copies of its inputs; `run` copies the step's inputs in (the cached
context only when it is a different tensor: the sampler adopts the graph's copy as its memo, so within a block
nothing large moves) and replays. The logits it returns live in the graph's output buffer until its next
replay, which the sampler's single stream orders after every read of them. Any failure to capture turns
graphs off for the sampler (logged) and the step runs eagerly. On the CPU (tests) nothing is captured: the
same static buffers are run eagerly, so the bookkeeping is what the tests check.

On for CUDA devices; `TINKERBELL_DIFFUSION_CUDA_GRAPHS=0` (or `DiffusionSampler(cuda_graphs=False)`) turns them
off. Replays give the eager path's tokens (the same kernels on the same buffers; tests/engine/test_diffusion_graphs).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any

import torch

log = logging.getLogger("tinkerbell.diffusion")

ENV = "TINKERBELL_DIFFUSION_CUDA_GRAPHS"
MAX_GRAPHS = 4  # shapes kept at once (each holds its inputs, a cached context and its logits)
# GPU memory the graphs' copies of cached contexts may hold together. A large batch over long contexts (16 x 4k
# tokens of LLaDA-8B: 34 GB) would not fit a second time, and such a step is bound by its matmuls, not by
# launches: it runs eagerly. LLaDA-8B at 16 x 192 keys is 1.6 GB.
MAX_PAST_BYTES = 8 << 30
# Only forwards of at most this many new tokens are graphed. Below it a step is bound by weight reads and kernel
# launches, which a replay removes; above it (16 requests x a 32-token block) the GPU's matmuls take longer than
# Python takes to launch them, so a graph saves nothing, while the batch shapes that staggered HTTP arrivals make
# change every few steps and each new one would cost a capture (two warm-up forwards and the capture itself).
# Measured on the H100 (docs/benchmarks.md): graphs took 1 request from 41 to 96 tok/s but 16 concurrent
# requests from 7.5 to 4.5 req/s at 32 steps.
MAX_GRAPH_TOKENS = 256

Key = tuple[Any, ...]


def wanted(device: torch.device, flag: bool | None) -> bool:
    """An explicit flag wins (on the CPU it runs the static-buffer path without capture, which tests use);
    otherwise CUDA devices use graphs unless the environment variable says 0 (or false/off/no)."""
    if flag is not None:
        return flag
    return device.type == "cuda" and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


class _Graph:
    def __init__(self, model: Any, ids: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor,
                 past: torch.Tensor | None, index: torch.Tensor):
        self.model = model
        self.ids, self.pos, self.key_mask, self.index = ids.clone(), pos.clone(), key_mask.clone(), index.clone()
        self.past = None if past is None else past.clone()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits = torch.empty(0)
        if ids.device.type != "cuda":
            return  # the CPU runs the same static buffers eagerly (see `run`): the tests' view of this path
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (lazy inits, autotuning)
            for _ in range(2):
                self._call()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._call()

    def _call(self) -> torch.Tensor:
        return self.model(self.ids, self.pos, self.key_mask, past=self.past, logits_rows=self.index)[0]

    def run(self, ids: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor, past: torch.Tensor | None,
            index: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        self.key_mask.copy_(key_mask)
        self.index.copy_(index)
        if past is not None and past is not self.past:
            assert self.past is not None
            self.past.copy_(past)
        if self.graph is None:
            self.logits = self._call()
        else:
            self.graph.replay()
        return self.logits


class GraphCache:
    """Graphs by shape, least recently used dropped beyond MAX_GRAPHS; a shape is captured on its second sight;
    forwards of more than MAX_GRAPH_TOKENS new tokens run eagerly."""

    def __init__(self, model: Any, max_graphs: int = MAX_GRAPHS, max_past_bytes: int = MAX_PAST_BYTES,
                 max_tokens: int = MAX_GRAPH_TOKENS):
        self.model, self.max_graphs, self.max_past_bytes = model, max_graphs, max_past_bytes
        self.max_tokens = max_tokens
        self.graphs: OrderedDict[Key, _Graph] = OrderedDict()
        self.seen: OrderedDict[Key, None] = OrderedDict()
        self.failed = False
        self.replays = 0
        self.captures = 0

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor, past: torch.Tensor | None,
                index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(logits, the graph's copy of `past`) from a replay, or None: run this forward eagerly."""
        if self.failed or ids.numel() > self.max_tokens:
            return None
        key = (tuple(ids.shape), tuple(key_mask.shape), None if past is None else tuple(past.shape),
               index.numel(), ids.device)
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen:
                self.seen[key] = None
                while len(self.seen) > 64:
                    self.seen.popitem(last=False)
                return None
            if _bytes(past) > self.max_past_bytes:
                return None
            try:
                graph = _Graph(self.model, ids, pos, key_mask, past, index)
            except Exception:  # noqa: BLE001 - graphs are an optimisation: fall back to eager for good
                log.exception("CUDA graph capture of a diffusion forward failed; running eagerly from now on")
                self.failed = True
                return None
            self.captures += 1
            self.graphs[key] = graph
            while len(self.graphs) > self.max_graphs or (
                    len(self.graphs) > 1 and sum(_bytes(g.past) for g in self.graphs.values()) > self.max_past_bytes):
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        self.replays += 1
        return graph.run(ids, pos, key_mask, past, index), graph.past


def _bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()
