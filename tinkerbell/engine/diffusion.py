"""Generation for masked-diffusion LMs (LLaDA), and `DiffusionSampler`, the engine's sampler for them.

A request's sequence is its prompt followed by `max_tokens` mask tokens, cut into blocks of `block_length`.
Blocks are unmasked left to right (semi-autoregressive); within a block every step runs the model, proposes a
token for each masked position and commits some of them:

* fixed schedule (the reference's `get_num_transfer_tokens`): the block's masked count spread evenly over its
  share of `steps`, the remainder on the first steps; the most confident proposals are committed
  (`remasking=low_confidence`: the proposal's softmax probability; `random`: uniform scores);
* `threshold` (Fast-dLLM): commit every proposal above it, and always at least the most confident one;
* `factor` (Fast-dLLM's dynamic rule): commit the n most confident while the n-th clears 1 - factor / (n + 1).

Temperature draws proposals with Gumbel noise (argmax of logits - T·log(-log u)), which is the reference's
`exp(logits) / (-log u)^T` in log space. `cfg_scale` > 0 runs an unconditional companion row (the prompt
masked out) and mixes `un + (s + 1)(cond - un)`.

Algorithms are strategies over one model forward (DESIGN.md), chosen per request:
* `basic` (aliases `no_cache`, `simple`): every step runs the whole sequence;
* `prefix_cache`: a block's first step runs the whole sequence and keeps the keys/values before the block;
  later steps run only the block and what follows it over that cached prefix (approximate: the prefix's keys
  are not refreshed as the block changes);
* `dual_cache`: also caches the keys/values after the block; later steps run only the block itself.

`DiffusionSampler` batches heterogeneous requests: every running sequence advances one step per model
forward, each with its own parameters, position in its own block and algorithm; padding is masked out of
attention; a sequence leaves the batch as soon as it is done (a stop token in a finished block ends it) and
waiting requests join at once, each starting at its own first block.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from tinkerbell.engine import gather, sampling
from tinkerbell.engine.diffusion_graphs import GraphCache
from tinkerbell.engine.diffusion_memory import DiffusionMemory
from tinkerbell.engine.diffusion_params import DiffusionParams, validate_request
from tinkerbell.engine.diffusion_graphs import wanted as graphs_wanted
from tinkerbell.engine.models.llada import LLaDAModel
from tinkerbell.engine.sampler import settle
from tinkerbell.engine.diffusion_rules import (  # noqa: F401 - re-exported: the API, tests and benches import them here
    ALGORITHMS,
    ALIASES,
    REMASKING,
    algorithm_listing,
    canonical_algorithm,
    propose,
    select_transfer,
    transfer_schedule,
)
from tinkerbell.engine.types import EngineUserError, SampledSequence, SampleJob, SampleResult

# A step whose cache-building rows and cached rows would waste more padded positions than this together runs
# them as two forwards (see DiffusionSampler._logits): about where a GPU forward turns from weight-bound to
# compute-bound, so below it the second pass over the weights costs more than the padding.
SPLIT_TOKENS = 256
_clock, _sleep = time.monotonic, time.sleep  # the admission's clock (tests run it on a fake one)

log = logging.getLogger("tinkerbell.diffusion")


@dataclass
class _Group:
    """One request: its `num_samples` rows, resolved together."""

    job: SampleJob
    future: Future
    params: DiffusionParams
    stop_ids: frozenset[int]
    rows: list["_Row"] = field(default_factory=list)
    arrived: float = field(default_factory=lambda: _clock())
    left: int = 0


@dataclass
class _Row:
    group: _Group
    index: int
    x: torch.Tensor  # [prompt + gen_length] on device; mask ids where not yet committed
    prompt_len: int
    gen: torch.Generator | None
    logprobs: torch.Tensor  # [gen_length] raw logprob of each token when committed
    block: int = 0
    step: int = 0
    masked: int = 0  # masked positions left in the current block
    schedule: list[int] = field(default_factory=list)
    kv: torch.Tensor | None = None  # [layers, 2, L, Hkv, hd]: prefix (prefix_cache) or whole sequence (dual)
    un_kv: torch.Tensor | None = None  # the same for the unconditional (CFG) companion
    done: bool = False
    stop_reason: str = "length"
    length: int = 0  # generated tokens kept (up to and including a stop token)

    @property
    def params(self) -> DiffusionParams:
        return self.group.params

    def bounds(self) -> tuple[int, int]:
        s = self.prompt_len + self.block * self.params.block_length
        return s, min(s + self.params.block_length, len(self.x))

    def start_block(self) -> None:
        s, e = self.bounds()
        self.step, self.masked, self.kv, self.un_kv = 0, e - s, None, None
        self.schedule = transfer_schedule(e - s, self.params.steps_per_block)


@dataclass
class _Query:
    """One model row of the batch: what it feeds, its context, where its block's logits sit."""

    row: _Row
    uncond: bool
    ids: torch.Tensor
    start: int  # position of ids[0]
    ctx: list[tuple[int, int]]  # slices of the cached kv the row attends to
    block_offset: int  # index of the block's first position within ids
    refresh: bool  # store this forward's keys/values as the row's cache


class DiffusionSampler:
    """The engine's sampler for diffusion LMs; the interface of `Sampler` (add_request/step/has_work/...).
    `batch_size` caps the sequences per forward, `max_wait_time` is how long an idle sampler waits for a batch
    to fill before starting, `max_batch_tokens` bounds the tokens of one forward, `memory_bytes` what the running
    rows may hold in memory (diffusion_memory.py; None: unbounded), `split_tokens` is the padding a step may save
    by running its cache-building and cached rows apart (see `_logits`)."""

    def __init__(self, model: LLaDAModel, device: torch.device, dtype: torch.dtype, eos_token_ids: list[int],
                 decode: Callable[[list[int]], str], max_context: int, algorithm: str = "basic",
                 batch_size: int = 16, max_wait_time: float = 0.0, max_batch_tokens: int = 65536,
                 memory_bytes: int | None = None, default_block_length: int = 32, split_tokens: int = SPLIT_TOKENS,
                 cuda_graphs: bool | None = None):
        if model.cfg.mask_token_id is None:
            raise ValueError("diffusion model config has no mask_token_id")
        self.model, self.cfg = model, model.cfg
        if torch.device(device).type == "cuda" and model.transformer.blocks[0].qkv is None:
            model.fuse_projections()  # one matmul for q/k/v and one for gate/up (the AR sampler's fast path does too)
        self.device, self.dtype = torch.device(device), dtype
        self.mask_id = int(model.cfg.mask_token_id)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.decode = decode
        self.max_context = max_context
        self.algorithm = canonical_algorithm(algorithm)
        self.batch_size, self.max_wait_time = int(batch_size), float(max_wait_time)
        self.max_batch_tokens, self.default_block_length = int(max_batch_tokens), int(default_block_length)
        self.split_tokens = int(split_tokens)
        self.memory = DiffusionMemory.for_model(model.cfg, dtype, memory_bytes)
        model.rope_table(max_context)  # cos/sin of every position a request may reach, built once (before any graph)
        # CUDA graphs of the block steps (diffusion_graphs.py): None = on for CUDA unless
        # TINKERBELL_DIFFUSION_CUDA_GRAPHS=0.
        self._graphs = GraphCache(model) if graphs_wanted(self.device, cuda_graphs) else None
        self._waiting: deque[_Row] = deque()
        self._running: list[_Row] = []
        self._groups: dict[int, _Group] = {}
        self._ids = itertools.count()
        self._hist: Counter[int] = Counter()
        self._past: torch.Tensor | None = None  # the last forward's assembled cache, and what it was built from
        self._past_sources: list[tuple[Any, ...]] = []
        self._counters = {"requests_finished": 0, "requests_failed": 0, "tokens_generated": 0, "steps": 0,
                          "forward_tokens": 0, "forwards": 0}

    # ------------------------------------------------------------------------------------------- adapters

    def register_adapter(self, key: str, source: Any) -> None:
        raise EngineUserError("LoRA adapters are not supported for diffusion models (LLaDA)")

    def unregister_adapter(self, key: str) -> bool:
        return False

    # ------------------------------------------------------------------------------------------- requests

    def add_request(self, job: SampleJob, fut: Future) -> None:
        params = validate_request(job, self.cfg.vocab_size, self.mask_id, self.max_context, self.memory,
                                  self.algorithm, self.default_block_length)
        stop_ids = {int(t) for t in job.stop_token_ids} | (set(self.eos_token_ids) if job.stop_at_eos else set())
        group = _Group(job, fut, params, frozenset(stop_ids), left=job.num_samples)
        prompt = torch.tensor(job.prompt, dtype=torch.long, device=self.device)
        for i in range(job.num_samples):
            x = torch.cat([prompt, torch.full((params.gen_length,), self.mask_id, dtype=torch.long,
                                              device=self.device)])
            gen = None
            if params.temperature > 0 or params.remasking == "random":
                gen = sampling.make_generator(job.seed, i, self.device)
            row = _Row(group, i, x, len(job.prompt), gen,
                       torch.zeros(params.gen_length, dtype=torch.float32, device=self.device))
            row.start_block()
            group.rows.append(row)
            self._waiting.append(row)
        self._groups[next(self._ids)] = group

    # ------------------------------------------------------------------------------------------- the loop

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def _admit(self) -> None:
        if not self._running and self._waiting and len(self._waiting) < self.batch_size:
            # An idle sampler waits up to max_wait_time for a fuller first batch (the existing server's knob), and
            # while a burst is still arriving (gather.py): started one by one, a burst's rows would sit in
            # different phases of their blocks, and most steps would pay a second forward for the rows (re)building
            # their cache (on the CPU, 16 requests at once over HTTP ran 47 steps of a 32-step run).
            now, first = _clock(), self._waiting[0].group.arrived
            last = self._waiting[-1].group.arrived
            wait = max(self.max_wait_time - (now - first), gather.wait_left(now, first, last))
            if wait > 0:
                _sleep(min(wait, 0.005))
                return
        tokens = sum(_row_tokens(r) for r in self._running)
        held = sum(self._row_bytes(r) for r in self._running)
        budget = self.memory.budget_bytes
        while self._waiting and len(self._running) < self.batch_size:
            row = self._waiting[0]
            cost, need = _row_tokens(row), self._row_bytes(row)
            over = tokens + cost > self.max_batch_tokens or (budget is not None and held + need > budget)
            if self._running and over:
                break
            self._running.append(self._waiting.popleft())
            tokens, held = tokens + cost, held + need

    def _row_bytes(self, row: _Row) -> int:
        return self.memory.row_bytes(len(row.x), row.params.algorithm, row.params.cfg_scale)

    def step(self) -> None:
        """One model forward for every running sequence, one denoising step each; retire the finished."""
        self._reap_cancelled()
        self._admit()
        if not self._running:
            return
        rows = list(self._running)
        queries = [q for r in rows for q in self._queries(r)]
        pending: list[tuple[_Row, torch.Tensor]] = []
        with torch.inference_mode():
            per_query = iter(self._logits(queries))  # in query order: each row's, then its CFG companion's
            for row in rows:
                cond = next(per_query)
                if row.params.cfg_scale > 0:
                    un = next(per_query)
                    cond = un + (row.params.cfg_scale + 1) * (cond - un)
                count = self._denoise(row, cond)
                if count is not None:
                    pending.append((row, count))
            self._commit_counts(pending)
        self._counters["steps"] += 1
        self._hist[len(rows)] += 1
        self._running = [r for r in self._running if not r.done]
        if not self._running:
            self._past, self._past_sources = None, []  # an idle sampler holds no batch cache
        for row in rows:
            if row.done:
                self._row_done(row)

    def _queries(self, row: _Row) -> list[_Query]:
        s, e = row.bounds()
        algo = row.params.algorithm
        out = []
        for uncond in (False, True) if row.params.cfg_scale > 0 else (False,):
            x = row.x
            if uncond:
                x = x.clone()
                x[:row.prompt_len] = self.mask_id
            kv = row.un_kv if uncond else row.kv
            if algo == "basic" or kv is None:
                out.append(_Query(row, uncond, x, 0, [], s, refresh=algo != "basic"))
            elif algo == "prefix_cache":
                out.append(_Query(row, uncond, x[s:], s, [(0, s)], 0, refresh=False))
            else:
                out.append(_Query(row, uncond, x[s:e], s, [(0, s), (e, len(x))], 0, refresh=False))
        return out

    def _logits(self, queries: list[_Query]) -> list[torch.Tensor]:
        """Each query's block logits. Rows that attend over a cache feed a block (or what follows it), rows that
        (re)build theirs feed the whole sequence: padded into one forward, every short row would cost a long
        one's width. They run as two forwards when that saves more than `split_tokens` padded positions (below
        it, one pass over the weights is the cheaper: small batches are bound by reading the weights)."""
        cached = [i for i, q in enumerate(queries) if q.ctx]
        full = [i for i, q in enumerate(queries) if not q.ctx]

        def padded(idx: list[int]) -> int:
            return len(idx) * max((len(queries[i].ids) for i in idx), default=0)

        groups = [list(range(len(queries)))]
        if cached and full and padded(groups[0]) - padded(cached) - padded(full) > self.split_tokens:
            groups = [full, cached]
        out: list[torch.Tensor] = [torch.empty(0)] * len(queries)
        for idx in groups:
            logits = self._forward([queries[i] for i in idx])
            at = 0
            for i in idx:
                s, e = queries[i].row.bounds()
                out[i] = logits[at:at + e - s]
                at += e - s
        return out

    def _forward(self, queries: list[_Query]) -> torch.Tensor:
        """One padded forward over all queries; returns the logits of each query's block rows, in order."""
        cfg, dev = self.cfg, self.device
        b = len(queries)
        width = max(len(q.ids) for q in queries)
        ctx_lens = [sum(hi - lo for lo, hi in q.ctx) for q in queries]
        cw = max(ctx_lens)
        ids = torch.full((b, width), self.mask_id, dtype=torch.long, device=dev)
        # Positions, key mask and logits rows are known on the host: built there and sent in one copy each,
        # instead of a few small kernels per row.
        pos = torch.zeros((b, width), dtype=torch.long)
        key_mask = torch.zeros((b, cw + width), dtype=torch.bool)
        # The batch's cached keys/values change only when a row refreshes its cache or the batch changes: within
        # a block, steps reuse the assembled tensor instead of rebuilding it (a copy of every row's cache per step).
        # (A forward without cached context, e.g. the other half of a split step, leaves the memo alone.)
        reuse, past = False, None
        if cw:
            sources = [(q.row, q.uncond, tuple(q.ctx), q.row.un_kv if q.uncond else q.row.kv) for q in queries]
            # The buffer has room for the forward's own keys after the cached ones (cw + width): the model writes
            # them there and attends over the whole buffer, with no per-layer concatenation (models/llada.py).
            reuse = (self._past is not None and self._past.shape[3] == cw + width
                     and len(sources) == len(self._past_sources) and all(
                         new[0] is old[0] and new[1] == old[1] and new[2] == old[2] and new[3] is old[3]
                         for new, old in zip(sources, self._past_sources)))
            past = self._past if reuse else torch.zeros(cfg.num_layers, 2, b, cw + width, cfg.num_kv_heads,
                                                        cfg.head_dim, dtype=self.dtype, device=dev)
            self._past, self._past_sources = past, sources
        rows_index = []
        for i, q in enumerate(queries):
            n = len(q.ids)
            ids[i, :n] = q.ids
            pos[i, :n] = torch.arange(q.start, q.start + n)
            key_mask[i, cw:cw + n] = True
            key_mask[i, :ctx_lens[i]] = True
            if q.ctx and not reuse:
                kv = q.row.un_kv if q.uncond else q.row.kv
                assert kv is not None and past is not None
                at = 0
                for lo, hi in q.ctx:
                    past[:, :, i, at:at + hi - lo] = kv[:, :, lo:hi]
                    at += hi - lo
            s, e = q.row.bounds()
            rows_index += range(i * width + q.block_offset, i * width + q.block_offset + e - s)
        want_kv = any(q.refresh for q in queries)
        index = torch.tensor(rows_index, dtype=torch.long)
        pos, key_mask, index = (_to_device(t, dev) for t in (pos, key_mask, index))
        replayed = None
        if self._graphs is not None and not want_kv:
            replayed = self._graphs.forward(ids, pos, key_mask, past, index)
        if replayed is not None:
            logits, kv = replayed[0], None
            if past is not None:
                self._past = replayed[1]  # the graph's copy is the memo now: the next steps copy nothing big
        else:
            logits, kv = self.model(ids, pos, key_mask, past=past, logits_rows=index, want_kv=want_kv)
        self._counters["forward_tokens"] += sum(len(q.ids) for q in queries)
        self._counters["forwards"] += 1
        for i, q in enumerate(queries):
            if q.refresh:
                assert kv is not None
                s, _ = q.row.bounds()
                # prefix_cache keeps what precedes the block; dual_cache keeps every position.
                keep = s if q.row.params.algorithm == "prefix_cache" else len(q.ids)
                cache = kv[:, :, i, :keep].clone()
                if q.uncond:
                    q.row.un_kv = cache
                else:
                    q.row.kv = cache
        return logits

    def _denoise(self, row: _Row, logits: torch.Tensor) -> torch.Tensor | None:
        """Commit this step's tokens of the row's block. Under a fixed schedule the count committed is known
        on the host; under threshold/factor it is returned as a device scalar for `_commit_counts`, which reads
        all rows' counts in one sync after the step (not one sync per row)."""
        p = row.params
        s, e = row.bounds()
        block = row.x[s:e]
        mask = block == self.mask_id
        x0 = propose(logits, p.temperature, row.gen)
        logp = logits.log_softmax(-1).gather(-1, x0[:, None]).squeeze(-1)
        if p.remasking == "low_confidence":
            score = logits.softmax(-1).gather(-1, x0[:, None]).squeeze(-1)  # as the reference ranks them
        else:
            score = torch.rand(block.shape, generator=row.gen, device=block.device, dtype=torch.float64)
        conf = torch.where(mask, score.to(torch.float64), float("-inf"))
        k = row.schedule[row.step] if row.step < len(row.schedule) else 1
        transfer = select_transfer(conf, row.masked, k, p.threshold, p.factor)
        block.copy_(torch.where(transfer, x0, block))  # not block[transfer] = ...: a boolean index syncs the GPU
        g0 = s - row.prompt_len
        row.logprobs[g0:g0 + (e - s)] = torch.where(transfer, logp, row.logprobs[g0:g0 + (e - s)])
        row.step += 1
        if p.threshold is not None or p.factor is not None:
            return transfer.sum()
        row.masked -= k
        if row.masked <= 0:
            self._finish_block(row)
        return None

    def _commit_counts(self, pending: list[tuple[_Row, torch.Tensor]]) -> None:
        if not pending:
            return
        counts = torch.stack([c for _, c in pending]).tolist()
        for (row, _), n in zip(pending, counts):
            row.masked -= int(n)
            if row.masked <= 0:
                self._finish_block(row)

    def _finish_block(self, row: _Row) -> None:
        p, group = row.params, row.group
        s, e = row.bounds()
        job = group.job
        # Reading the block's tokens waits for the GPU: only when a stop or a stream needs them now (the
        # finished request reads every token once, at the end).
        needed = bool(group.stop_ids or job.stop_strings or job.on_block is not None)
        tokens = row.x[s:e].tolist() if needed else [0] * (e - s)  # else placeholders: only their count is used
        g0 = s - row.prompt_len
        row.length = g0 + len(tokens)
        stop_at = next((i for i, t in enumerate(tokens) if t in group.stop_ids), None)
        if stop_at is not None:
            row.length, row.done, row.stop_reason = g0 + stop_at + 1, True, "stop"
            tokens = tokens[:stop_at + 1]
        if group.job.stop_strings:
            cut = self._stop_string_cut(row, g0)
            if cut is not None:
                tokens = tokens[:max(0, cut - g0)]
                row.length, row.done, row.stop_reason = cut, True, "stop"
        if row.block + 1 >= p.num_blocks:
            row.done = True
        self._counters["tokens_generated"] += len(tokens)
        if group.job.on_block is not None:
            try:
                group.job.on_block(row.index, tokens, row.done)
            except Exception:  # noqa: BLE001 - a broken stream consumer must not stop the batch
                log.exception("on_block callback failed")
        if not row.done:
            row.block += 1
            row.start_block()

    def _stop_string_cut(self, row: _Row, g0: int) -> int | None:
        """The shortest generated length (>= g0) whose text contains a stop string, if any."""
        gen = row.x[row.prompt_len:row.prompt_len + row.length].tolist()
        if not any(s in self.decode(gen) for s in row.group.job.stop_strings):
            return None
        for n in range(max(1, g0), len(gen) + 1):
            if any(s in self.decode(gen[:n]) for s in row.group.job.stop_strings):
                return n
        return len(gen)

    # ------------------------------------------------------------------------------------------- results

    def _row_done(self, row: _Row) -> None:
        group = row.group
        group.left -= 1
        if group.left > 0:
            return
        self._forget(group)
        self._counters["requests_finished"] += 1
        seqs = []
        for r in group.rows:
            toks = r.x[r.prompt_len:r.prompt_len + r.length].tolist()
            seqs.append(SampledSequence(tokens=toks, logprobs=r.logprobs[:r.length].tolist(),
                                        stop_reason="stop" if r.stop_reason == "stop" else "length"))
        settle(group.future, result=SampleResult(sequences=seqs))

    def _forget(self, group: _Group) -> None:
        for key in [k for k, g in self._groups.items() if g is group]:
            del self._groups[key]

    def _reap_cancelled(self) -> None:
        dead = {id(g) for g in self._groups.values() if g.future.cancelled()}
        if not dead:
            return
        self._running = [r for r in self._running if id(r.group) not in dead]
        self._waiting = deque(r for r in self._waiting if id(r.group) not in dead)
        for g in [g for g in self._groups.values() if id(g) in dead]:
            self._forget(g)

    def fail_all(self, exc: BaseException) -> None:
        groups = list(self._groups.values())
        self._groups.clear()
        self._running, self._waiting = [], deque()
        for g in groups:
            self._counters["requests_failed"] += 1
            settle(g.future, exc=exc)

    def stats(self) -> dict[str, Any]:
        c = self._counters
        batches = sum(self._hist.values())
        return {
            "algorithm": self.algorithm,
            "max_batch_size": self.batch_size,
            "max_wait_time": self.max_wait_time,
            "running_seqs": len(self._running),
            "waiting_seqs": len(self._waiting),
            "pending_requests": len(self._groups),
            "batches_run": batches,
            "mean_batch_size": (sum(k * v for k, v in self._hist.items()) / batches) if batches else 0.0,
            "batch_size_histogram": {str(k): v for k, v in sorted(self._hist.items())},
            "cuda_graph_replays": self._graphs.replays if self._graphs is not None else 0,
            "cuda_graph_captures": self._graphs.captures if self._graphs is not None else 0,
            "memory_budget_bytes": self.memory.budget_bytes,
            "memory_held_bytes": sum(self._row_bytes(r) for r in self._running),
            **c,
        }


def _to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A host tensor on `dev` without stalling the host: a copy from pageable memory may wait for the GPU's
    queue to drain (the previous step), one from pinned memory with non_blocking does not."""
    if dev.type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def _row_tokens(row: _Row) -> int:
    return len(row.x) * (2 if row.params.cfg_scale > 0 else 1)


class RefusedTrainer:
    """Stands in for the trainer when the served model is a diffusion LM: every training call fails with a
    user error (LoRA training for LLaDA is not implemented), while stats keep their shape."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise EngineUserError("training is not supported for diffusion models (LLaDA); this server samples only")

        return refuse

    def stats(self) -> dict[str, Any]:
        return {"adapters": 0, "training": "not supported for diffusion models"}
