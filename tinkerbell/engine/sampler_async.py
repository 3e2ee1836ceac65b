"""Asynchronous decode: the host prepares and launches step n+1 before it reads step n's tokens.

What vLLM v1 calls async scheduling. In the steady decode state (every running sequence decodes one token,
nothing to admit) the token sampled at step n stays on the GPU and becomes step n+1's input id there (the
runner copies it into the graph's id buffer); the host launches n+1 first, then waits for step n's
non-blocking device→host copy (a CUDA event) and does its bookkeeping (append, stop checks, streaming,
retiring) while the GPU runs n+1. So at batch 1 the host work per step hides behind the forward instead of
adding to it, and at batch 256 the per-sequence Python does.

A sequence's length therefore runs ahead of its known tokens by the tokens still on the GPU
(`Sequence.num_pending`, 0 to 2). What step n+1 needs is known without them: the position of its input
token, its KV slot (blocks are allocated by position), the Gumbel key (seed, position). A sequence that
ends by length at step n is left out of n+1 (that is known in advance); one that ends at step n by a stop
token or string has had one more token computed at n+1, which is discarded (never appended, counted or
streamed); its blocks are freed when step n is read, and as every later use of a freed block is a later
launch on the same stream, the discarded step's KV write cannot clobber it. Prefix-cache registration
covers only known tokens and happens when step n is read, exactly as the synchronous path does after n.

Sequences enter the loop when they become ready to decode: the first decode step of the synchronous path
leaves its decode rows in flight, and later ones (prefilled meanwhile) join a continuation step, their
input token copied from the host. What the decode step does not cover runs in a synchronous step beside
it in the same iteration, after step n+1 is launched and step n is read: admissions,
prefill chunks — the scheduler skips the
sequences in flight there and never preempts them. A continuation that would need more blocks than are
free is not launched: the next iteration is the synchronous path's, which preempts. Tensor parallelism
decodes synchronously (rank 0's plan must be the workers' plan; ids on rank 0's GPU are not). Outputs
equal the synchronous path's: the same positions and the same per-row noise keys, and batch composition
never changes a row's draw.

On the CPU there is no event: reading a step's tokens is a plain copy, and the same code runs (tests force
this mode on the CPU to check its bookkeeping).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from tinkerbell.engine.runner import DecodeRows, StepPlan
from tinkerbell.engine.sampling import RowSampling, to_device
from tinkerbell.engine.scheduler import ScheduledSeq, SeqStatus, Sequence, SequenceGroup

if TYPE_CHECKING:
    from tinkerbell.engine.sampler import Sampler


@dataclass
class Inflight:
    """A launched decode step whose tokens the host has not read yet."""

    seqs: list[Sequence]  # one per row, in row order
    tokens: torch.Tensor  # int64 [b] on the device: the sampled tokens (the next step's input ids)
    host: torch.Tensor  # float64 [2, b]: tokens and their logprobs (pinned on CUDA, filled by a non-blocking copy)
    event: "torch.cuda.Event | None"  # recorded after that copy (None on the CPU: the copy was synchronous)
    pos: np.ndarray  # int64 [b]: position of each row's input token in this step
    limit: np.ndarray  # int64 [b]: the length at which each row's sequence stops by length
    tables: np.ndarray  # int32 [b, width]: block-table mirror of the rows
    tables_version: int
    lora: np.ndarray  # int64 [b]: LoRA slot of each row (-1: none)
    sampling: RowSampling
    topk_k: int  # the most top-k logprobs a row wants (0: none)
    topk: tuple[torch.Tensor, torch.Tensor] | None  # ids int32 / logprobs float32 [b, topk_k], copied like `host`

    def read(self) -> tuple[list[int], list[float]]:
        if self.event is not None:
            self.event.synchronize()
        return self.host[0].long().tolist(), self.host[1].tolist()


def _topk_k(seqs: list[Sequence]) -> int:
    return max((q.group.job.topk_sample_logprobs for q in seqs), default=0)


def _now() -> float:
    return time.perf_counter()


class AsyncDecoder:
    def __init__(self, sampler: "Sampler"):
        self.s = sampler
        self.inflight: Inflight | None = None
        self._versions = itertools.count()
        self.launched = 0  # steps launched before the previous one was read (the overlapped ones)
        self.joined = 0  # sequences that entered the asynchronous loop while a step was in flight
        self.side_steps = 0  # synchronous steps (admissions, prefill chunks) run beside a step in flight
        # Seconds the host spent waiting for a step's tokens: near the whole run time means the GPU is the
        # bottleneck (the host work is hidden), near zero that the host is.
        self.wait_s = 0.0

    # ------------------------------------------------------------------------------------------- entry points

    @staticmethod
    def deferrable(scheduled: list[ScheduledSeq], rows: list) -> list[bool]:
        """Which rows of a synchronous-path step can be read later: decode rows (one token, sampling, their
        prompt done before this step, so no fork)."""
        return [item.num_tokens == 1 and r.sample is not None and not len(r.prompt_rows) and item.seq.group.prefilled
                for item, r in zip(scheduled, rows)]

    def launch_scheduled(self, scheduled: list[ScheduledSeq], sample_rows: list[int], logits: torch.Tensor,
                         lse: torch.Tensor) -> None:
        """Sample these decode rows of a synchronous-path step (`sample_rows`: their rows of `logits`) on the
        device and leave them in flight, unread: the asynchronous loop starts from them."""
        if sample_rows != list(range(logits.shape[0])):
            index = to_device(np.asarray(sample_rows, dtype=np.int64), logits.device)
            logits, lse = logits[index], lse[index]
        seqs = [item.seq for item in scheduled]
        bs = self.s.blocks.block_size
        b = len(seqs)
        pos = np.fromiter((s.num_computed for s in seqs), dtype=np.int64, count=b)
        # Room for the next block before the mirror grows; never wider than the runner's static table.
        width = min(max(len(s.block_table) for s in seqs) + 1, self._max_width())
        tables = np.zeros((b, width), dtype=np.int32)
        for i, s in enumerate(seqs):
            tables[i, :len(s.block_table)] = s.block_table
            s.num_computed += 1
            s.num_pending += 1
        assert all(len(s.block_table) * bs > p for s, p in zip(seqs, pos.tolist()))
        limit = np.fromiter((self._limit(s.group) for s in seqs), dtype=np.int64, count=b)
        lora = np.fromiter((-1 if s.group.slot is None else s.group.slot for s in seqs), dtype=np.int64, count=b)
        sampling = RowSampling.build([s.group.params for s in seqs], [s.seed for s in seqs], logits.device)
        self.inflight = self._sample(seqs, logits, lse, pos, limit, tables, next(self._versions), lora, sampling,
                                     _topk_k(seqs))

    def advance(self) -> None:
        """Launch the next decode step (its rows, plus sequences that became ready to decode), read and book
        the one in flight, then run what the decode step does not cover — admissions, prefill chunks, decodes
        that found no free block to join — as a synchronous step beside it."""
        prev = self.inflight
        assert prev is not None
        with torch.inference_mode():
            nxt = self._continue(prev)
        self.inflight = nxt
        self._book(prev)
        if nxt is None:
            return  # the next step() is the synchronous path's
        sch = self.s.scheduler
        in_flight = {id(q) for q in nxt.seqs if q.status is SeqStatus.RUNNING}
        budget = sch.max_batch_tokens - len(nxt.seqs)
        if budget > 0 and (len(sch.running) > len(in_flight) or sch.may_admit()):
            self.side_steps += 1
            self.s.step_scheduled(skip=in_flight, budget=budget)

    def drop(self) -> None:
        self.inflight = None

    # ------------------------------------------------------------------------------------------- launching

    def _max_width(self) -> int:
        return -(-self.s.max_context // self.s.blocks.block_size)

    def _limit(self, group: SequenceGroup) -> int:
        return min(group.prompt_len + group.job.max_tokens, self.s.max_context)

    def _continue(self, prev: Inflight) -> Inflight | None:
        """Step n+1 over step n's rows from the arrays of step n, joined by sequences that became ready to
        decode; None where the synchronous path must run."""
        s = self.s
        sch, blocks = s.scheduler, s.blocks
        # Rows that go on: still running (not cancelled, not finished) and not ending by length at step n.
        alive = np.fromiter((q.status is SeqStatus.RUNNING for q in prev.seqs), dtype=bool, count=len(prev.seqs))
        keep_mask = alive & (prev.pos + 2 < prev.limit)
        pos = prev.pos + 1
        bs = blocks.block_size
        fresh = keep_mask & (pos % bs == 0)  # the input token starts a block: allocate it
        if int(fresh.sum()) > blocks.num_free:
            return None  # the synchronous path preempts
        joiners = self._joiners(prev, int(alive.sum()))
        if not keep_mask.any() and not joiners:
            return None
        topk_k = prev.topk_k
        if keep_mask.all():
            seqs, tables, limit, lora, sampling = prev.seqs, prev.tables, prev.limit, prev.lora, prev.sampling
            ids, version = prev.tokens, prev.tables_version
        else:
            keep = np.flatnonzero(keep_mask)
            seqs = [prev.seqs[i] for i in keep.tolist()]
            pos, fresh = pos[keep], fresh[keep]
            tables, limit, lora = prev.tables[keep], prev.limit[keep], prev.lora[keep]
            sampling = prev.sampling.subset(keep)
            ids = prev.tokens.index_select(0, to_device(keep.astype(np.int64), prev.tokens.device))
            version = next(self._versions)
            topk_k = _topk_k(seqs)
        col = pos // bs
        if fresh.any():
            need = int(col.max()) + 1
            if need > tables.shape[1]:  # grow the mirror by a few blocks at once
                grown = min(need + 8, self._max_width())
                tables = np.concatenate([tables, np.zeros((len(seqs), grown - tables.shape[1]), np.int32)], 1)
            for i in np.flatnonzero(fresh).tolist():
                seq = seqs[i]
                assert len(seq.block_table) == col[i]
                blk = blocks.allocate()
                seq.block_table.append(blk)
                tables[i, col[i]] = blk
            version = next(self._versions)
        copies: list[tuple[int, int, int]] = []
        joined: list[Sequence] = []
        for q in joiners:
            c = sch.reserve(q, 1)  # its next block, or a copy of a shared partial block (a fresh sample)
            if c is None:
                break  # out of blocks: the rest decode in the synchronous step beside
            copies += c
            joined.append(q)
        if joined:
            seqs, pos, tables, limit, lora, sampling, ids = self._join(
                joined, seqs, pos, tables, limit, lora, sampling, ids)
            version = next(self._versions)
            self.joined += len(joined)
            topk_k = _topk_k(seqs)
        if not seqs:
            return None
        rows_ix = np.arange(len(seqs))
        slots = tables[rows_ix, pos // bs].astype(np.int64) * bs + pos % bs
        for seq in seqs:
            seq.num_computed += 1
            seq.num_pending += 1
        s._counters["steps"] += 1
        self.launched += 1
        rows = DecodeRows(ids=ids, pos=pos, slots=slots, tables=tables, tables_version=version, lora=lora)
        if not sampling.filtered:  # plain draws: the runner samples inside its graph
            rows.keys, rows.temps = sampling.keys(pos + 1), sampling.host_temps
        plan = StepPlan(rows=rows)
        sampled = s.execute_sampled(plan, copies)
        if sampled is not None:
            # The tokens are cloned out of the static buffer: a synchronous step beside this one may replay a
            # graph before they become the next step's input ids.
            device = [sampled.both]
            if topk_k:
                device += self._topk(sampled.logits, sampled.lse, topk_k)
            return self._inflight(seqs, sampled.tokens.clone(), device, pos, limit, tables, version, lora, sampling,
                                  topk_k)
        logits = s.execute(plan, copies)
        return self._sample(seqs, logits, logits.logsumexp(dim=-1), pos, limit, tables, version, lora, sampling,
                            topk_k)

    def _joiners(self, prev: Inflight, alive: int) -> list[Sequence]:
        """Running sequences outside the step in flight that are ready to decode (their prompt done, their
        last token known)."""
        sch = self.s.scheduler
        if len(sch.running) <= alive:
            return []
        mine = {id(q) for q in prev.seqs}
        return [q for q in sch.running if id(q) not in mine and q.num_pending == 0 and q.num_uncomputed == 1
                and q.group.prefilled]

    def _join(self, joined: list[Sequence], seqs: list[Sequence], pos: np.ndarray, tables: np.ndarray,
              limit: np.ndarray, lora: np.ndarray, sampling: RowSampling,
              ids: torch.Tensor) -> tuple[list[Sequence], np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                          RowSampling, torch.Tensor]:
        """The rows of `seqs` followed by rows for `joined` (input: their last known token, from the host)."""
        n, m = len(seqs), len(joined)
        width = min(max(tables.shape[1], max(len(q.block_table) for q in joined) + 1), self._max_width())
        merged = np.zeros((n + m, width), dtype=np.int32)
        merged[:n, :tables.shape[1]] = tables
        for i, q in enumerate(joined):
            merged[n + i, :len(q.block_table)] = q.block_table
        all_seqs = seqs + joined
        new_ids = to_device(np.array([q.tokens[-1] for q in joined], dtype=np.int64), ids.device)
        return (all_seqs,
                np.concatenate([pos, np.array([q.num_computed for q in joined], dtype=np.int64)]),
                merged,
                np.concatenate([limit, np.array([self._limit(q.group) for q in joined], dtype=np.int64)]),
                np.concatenate([lora, np.array([-1 if q.group.slot is None else q.group.slot for q in joined],
                                               dtype=np.int64)]),
                RowSampling.build([q.group.params for q in all_seqs], [q.seed for q in all_seqs], ids.device),
                torch.cat([ids, new_ids]))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, lse: torch.Tensor, pos: np.ndarray,
                limit: np.ndarray, tables: np.ndarray, version: int, lora: np.ndarray,
                sampling: RowSampling, topk_k: int) -> Inflight:
        # The token drawn from a row whose input sits at `pos` takes index pos + 1 (its Gumbel key position).
        tokens = sampling.sample(logits, pos + 1)
        lps = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
        device = [torch.stack([tokens.double(), lps.double()])]  # token ids are exact in float64
        if topk_k:
            device += self._topk(logits, lse, topk_k)
        return self._inflight(seqs, tokens, device, pos, limit, tables, version, lora, sampling, topk_k)

    @staticmethod
    def _topk(logits: torch.Tensor, lse: torch.Tensor, k: int) -> list[torch.Tensor]:
        """As sampling.topk: the k highest logits of each row, as logprobs (ids int32, logprobs float32)."""
        values, ids = logits.topk(k, dim=-1)
        return [ids.to(torch.int32), (values.float() - lse[:, None]).to(torch.float32)]

    def _inflight(self, seqs: list[Sequence], tokens: torch.Tensor, device: list[torch.Tensor], pos: np.ndarray,
                  limit: np.ndarray, tables: np.ndarray, version: int, lora: np.ndarray, sampling: RowSampling,
                  topk_k: int) -> Inflight:
        """The step in flight, its [tokens; logprobs] (and top-k) copied to pinned host memory without waiting."""
        both = device[0]
        event = None
        if both.is_cuda:
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in device]
            event = torch.cuda.Event()
            event.record()
        else:
            host = [t.clone() for t in device]  # `both` may be the runner's static buffer, which the next step reuses
        topk = (host[1], host[2]) if topk_k else None
        return Inflight(seqs, tokens, host[0], event, pos, limit, tables, version, lora, sampling, topk_k, topk)

    # ------------------------------------------------------------------------------------------- reading

    def _book(self, rec: Inflight) -> None:
        """Step n's tokens into their sequences, as the synchronous path does after its forward; rows of
        sequences that ended meanwhile (stopped at n - 1, cancelled) are discarded."""
        s = self.s
        sch, counters = s.scheduler, s._counters
        bs = s.blocks.block_size
        t0 = _now()
        tokens, lps = rec.read()
        self.wait_s += _now() - t0
        topk_ids = topk_lps = None
        if rec.topk is not None:
            # Copied out of the pinned buffers, which the rows' slices would otherwise keep alive.
            topk_ids, topk_lps = rec.topk[0].numpy().copy(), rec.topk[1].numpy().copy()
        finished: list[tuple[Sequence, str]] = []
        for i, (seq, token, lp, limit) in enumerate(zip(rec.seqs, tokens, lps, rec.limit.tolist())):
            if seq.status is not SeqStatus.RUNNING:
                continue
            seq.num_pending -= 1
            counters["tokens_computed"] += 1
            if min(seq.num_computed, len(seq.tokens)) // bs > seq.num_registered:
                sch.register_full_blocks(seq)
            seq.tokens.append(token)
            seq.logprobs.append(lp)
            counters["tokens_generated"] += 1
            group = seq.group
            k = group.job.topk_sample_logprobs
            if k:
                seq.topk_ids.append(topk_ids[i, :k])
                seq.topk_logprobs.append(topk_lps[i, :k])
            reason = None
            # The sampler's one stop rule, evaluated only where it can fire (most rows of most steps go on).
            if token in group.stop_ids or group.job.stop_strings or len(seq.tokens) >= limit:
                reason = s._stop_reason(seq, token)
            if group.on_token is not None:
                s._stream(seq, token, lp)
            if reason is not None:
                finished.append((seq, reason))
        if finished:
            sch.finish_many(finished)
            for group in {id(q.group): q.group for q, _ in finished}.values():
                if group.done:
                    s._complete(group)
