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

The synchronous path (sampler.py) keeps everything else: prefill and chunked steps, admissions (a step
where the scheduler could admit goes back to it), preemption (a continuation that would need more blocks
than are free goes back to it, which preempts), top-k sample logprobs, tensor parallelism (rank 0's plan
must be the workers' plan; ids on rank 0's GPU are not). Outputs equal the synchronous path's: the same
rows, the same positions and the same per-row noise keys; batch composition never changes a row's draw.

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
from tinkerbell.engine.sampling import RowSampling, _to_device
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

    def read(self) -> tuple[list[int], list[float]]:
        if self.event is not None:
            self.event.synchronize()
        return self.host[0].long().tolist(), self.host[1].tolist()


def _now() -> float:
    return time.perf_counter()


class AsyncDecoder:
    def __init__(self, sampler: "Sampler"):
        self.s = sampler
        self.inflight: Inflight | None = None
        self._versions = itertools.count()
        self.launched = 0  # steps launched before the previous one was read (the overlapped ones)
        # Seconds the host spent waiting for a step's tokens: near the whole run time means the GPU is the
        # bottleneck (the host work is hidden), near zero that the host is.
        self.wait_s = 0.0

    # ------------------------------------------------------------------------------------------- entry points

    @staticmethod
    def deferrable(scheduled: list[ScheduledSeq], rows: list) -> bool:
        """A step of the synchronous path whose reading can wait: pure decode, every row samples once in row
        order, no prompt rows, no forks, no top-k logprobs (those read more than tokens)."""
        for item, r in zip(scheduled, rows):
            group = item.seq.group
            if (item.num_tokens != 1 or r.sample is None or len(r.prompt_rows) or not group.prefilled
                    or group.job.topk_sample_logprobs):
                return False
        return True

    def launch_scheduled(self, scheduled: list[ScheduledSeq], logits: torch.Tensor, lse: torch.Tensor) -> None:
        """Sample the synchronous path's decode step on the device and leave it in flight (not read)."""
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
        self.inflight = self._sample(seqs, logits, lse, pos, limit, tables, next(self._versions), lora, sampling)

    def advance(self) -> None:
        """Launch the next decode step if the steady state holds, then read and book the one in flight."""
        prev = self.inflight
        assert prev is not None
        with torch.inference_mode():
            nxt = self._continue(prev)
        self.inflight = nxt
        self._book(prev)

    def drop(self) -> None:
        self.inflight = None

    # ------------------------------------------------------------------------------------------- launching

    def _max_width(self) -> int:
        return -(-self.s.max_context // self.s.blocks.block_size)

    def _limit(self, group: SequenceGroup) -> int:
        return min(group.prompt_len + group.job.max_tokens, self.s.max_context)

    def _continue(self, prev: Inflight) -> Inflight | None:
        """Step n+1 over step n's rows from the arrays of step n; None where the synchronous path must run."""
        s = self.s
        sch, blocks = s.scheduler, s.blocks
        if sch.may_admit():
            return None
        # Rows that go on: still running (not cancelled, not finished) and not ending by length at step n.
        alive = np.fromiter((q.status is SeqStatus.RUNNING for q in prev.seqs), dtype=bool, count=len(prev.seqs))
        keep_mask = alive & (prev.pos + 2 < prev.limit)
        if not keep_mask.any():
            return None
        pos = prev.pos + 1
        bs = blocks.block_size
        fresh = keep_mask & (pos % bs == 0)  # the input token starts a block: allocate it
        if int(fresh.sum()) > blocks.num_free:
            return None  # the synchronous path preempts
        if keep_mask.all():
            seqs, tables, limit, lora, sampling = prev.seqs, prev.tables, prev.limit, prev.lora, prev.sampling
            ids, version = prev.tokens, prev.tables_version
        else:
            keep = np.flatnonzero(keep_mask)
            seqs = [prev.seqs[i] for i in keep.tolist()]
            pos, fresh = pos[keep], fresh[keep]
            tables, limit, lora = prev.tables[keep], prev.limit[keep], prev.lora[keep]
            sampling = prev.sampling.subset(keep)
            ids = prev.tokens.index_select(0, _to_device(keep.astype(np.int64), prev.tokens.device))
            version = next(self._versions)
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
        rows_ix = np.arange(len(seqs))
        slots = tables[rows_ix, col].astype(np.int64) * bs + pos % bs
        for seq in seqs:
            seq.num_computed += 1
            seq.num_pending += 1
        s._counters["steps"] += 1
        self.launched += 1
        plan = StepPlan(rows=DecodeRows(ids=ids, pos=pos, slots=slots, tables=tables, tables_version=version,
                                        lora=lora))
        logits = s.execute(plan, [])
        return self._sample(seqs, logits, logits.logsumexp(dim=-1), pos, limit, tables, version, lora, sampling)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, lse: torch.Tensor, pos: np.ndarray,
                limit: np.ndarray, tables: np.ndarray, version: int, lora: np.ndarray,
                sampling: RowSampling) -> Inflight:
        # The token drawn from a row whose input sits at `pos` takes index pos + 1 (its Gumbel key position).
        tokens = sampling.sample(logits, pos + 1)
        lps = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
        both = torch.stack([tokens.double(), lps.double()])  # token ids are exact in float64
        event = None
        if both.is_cuda:
            host = torch.empty(both.shape, dtype=torch.float64, pin_memory=True)
            host.copy_(both, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = both
        return Inflight(seqs, tokens, host, event, pos, limit, tables, version, lora, sampling)

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
        finished: list[tuple[Sequence, str]] = []
        for seq, token, lp, limit in zip(rec.seqs, tokens, lps, rec.limit.tolist()):
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
