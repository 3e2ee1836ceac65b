"""Continuous-batching scheduler: which sequences run this step, with how many tokens, in which KV blocks.

Shape after vLLM v1 / nano-vllm: every step first serves the running sequences (a decode token each, or the next
chunk of an unfinished prefill) under one token budget, then admits waiting ones while blocks, LoRA slots and
budget allow. When blocks run out the newest running sequence is preempted by recompute: it drops its blocks,
keeps its tokens, and goes back to the front of the queue to be prefilled again (mostly from the prefix cache).

A request with `num_samples = n` starts as one sequence; when its prompt is prefilled the sampler forks it into
n sequences that share the prompt's blocks. A shared, partly filled last block is copied on the first write
(copy-on-write), so every sample gets its own tail while the full blocks exist once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

from tinkerbell.engine.kv_cache import BlockManager, block_hash
from tinkerbell.engine.lora_slots import LoraSlots
from tinkerbell.engine.sampling import SamplingParams
from tinkerbell.engine.types import EngineUserError, SampleJob


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SequenceGroup:
    """One request: its samples, where its prompt logprobs go, and the LoRA slot it pins while alive."""

    request_id: int
    job: SampleJob
    future: Future
    params: SamplingParams
    first_logprob_row: int  # first prompt row whose logits the request needs (rows up to len(prompt) - 2)
    stop_ids: frozenset[int]  # token ids that end a sample (EOS unless disabled, plus stop_token_ids)
    on_token: Callable[[int, int, float], None] | None = None  # job.on_token until it raises
    seqs: list["Sequence"] = field(default_factory=list)
    slot: int | None = None  # pinned LoRA slot (None: base model, or not admitted yet)
    salt: str = ""  # prefix-cache salt of the adapter weights it runs with (set when its slot is pinned)
    prefilled: bool = False  # the prompt is prefilled and all num_samples sequences exist
    started: bool = False  # admitted at least once
    cache_hit_tokens: int = 0
    prompt_logprobs: np.ndarray | None = None  # float32 [len(prompt)], NaN where not computed
    topk_prompt_ids: np.ndarray | None = None
    topk_prompt_logprobs: np.ndarray | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.job.prompt)

    @property
    def wants_prompt_rows(self) -> bool:
        return self.first_logprob_row < self.prompt_len - 1

    @property
    def done(self) -> bool:
        return self.prefilled and all(s.status is SeqStatus.FINISHED for s in self.seqs)


@dataclass(eq=False)
class Sequence:
    seq_id: int
    group: SequenceGroup
    sample_index: int
    tokens: list[int]  # prompt + generated
    generator: torch.Generator | None  # the reference sampler's noise source
    seed: int = 0  # the fast sampler's noise key (sampling.sample_fast)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache (or being computed by a launched step)
    # Tokens sampled on the GPU by launched steps but not read yet (asynchronous decode, 0 to 2): they follow
    # `tokens`, whose entries are all known. The scheduler counts them as the sequence's length.
    num_pending: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, computed lazily
    num_registered: int = 0  # leading full blocks already offered to the prefix cache
    logprobs: list[float] = field(default_factory=list)
    topk_ids: list[np.ndarray] = field(default_factory=list)
    topk_logprobs: list[np.ndarray] = field(default_factory=list)
    stop_reason: str | None = None

    @property
    def num_prompt(self) -> int:
        return self.group.prompt_len

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def length(self) -> int:
        """Known tokens plus those sampled on the GPU and not read yet."""
        return len(self.tokens) + self.num_pending

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) + self.num_pending - self.num_computed

    @property
    def in_prompt_prefill(self) -> bool:
        """Still prefilling the prompt before its first sample (the only time prompt logprobs are computed)."""
        return not self.group.prefilled

    def hashes(self, block_size: int, num_blocks: int) -> list[bytes]:
        """Hashes of its first `num_blocks` full blocks (token content never changes, so they are memoised)."""
        while len(self.block_hashes) < num_blocks:
            j = len(self.block_hashes)
            prev = self.block_hashes[-1] if j else None
            self.block_hashes.append(block_hash(prev, self.tokens[j * block_size:(j + 1) * block_size],
                                                self.group.salt))
        return self.block_hashes[:num_blocks]


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed on


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    copies: list[tuple[int, int, int]]  # (src block, dst block, slots): copy-on-write before the forward
    failed: list[tuple[SequenceGroup, BaseException]]  # groups that could not be admitted (e.g. bad checkpoint)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, lora: LoraSlots, max_batch_tokens: int, max_running_seqs: int):
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be at least 1")
        self.blocks, self.lora = blocks, lora
        self.max_batch_tokens, self.max_running_seqs = max_batch_tokens, max_running_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------------------------------- queues

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def may_admit(self) -> bool:
        """Whether the next schedule() could admit a waiting sequence (the asynchronous decode loop hands
        such steps to the synchronous path, which admits and prefills)."""
        return bool(self.waiting) and len(self.running) < self.max_running_seqs

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Children continue from the parent's state, sharing its blocks (reference counted)."""
        at = self.running.index(parent) + 1
        for child in children:
            child.num_computed = parent.num_computed
            child.block_table = list(parent.block_table)
            child.block_hashes = list(parent.block_hashes)
            child.num_registered = parent.num_registered
            child.status = SeqStatus.RUNNING
            self.blocks.share(parent.block_table)
        self.running[at:at] = children

    def finish(self, seq: Sequence, reason: str) -> None:
        self.finish_many([(seq, reason)])

    def finish_many(self, done: list[tuple[Sequence, str]]) -> None:
        """Retire sequences; one pass over the running list however many finish (a batch of 256 often
        finishes in one step)."""
        if not done:
            return
        for seq, reason in done:
            seq.stop_reason = reason
            self._release_blocks(seq)
            seq.status = SeqStatus.FINISHED
            seq.num_pending = 0  # a token sampled past the stop is discarded
        if len(done) == 1:
            self.running.remove(done[0][0])
        else:
            self.running = [s for s in self.running if s.status is not SeqStatus.FINISHED]

    def abort(self, group: SequenceGroup) -> None:
        """Drop every sequence of a group (cancelled or failed) and give back its blocks and slot."""
        for seq in group.seqs:
            if seq.status is SeqStatus.RUNNING:
                self.running.remove(seq)
            elif seq.status is SeqStatus.WAITING and seq in self.waiting:
                self.waiting.remove(seq)
            self._release_blocks(seq)
            seq.status = SeqStatus.FINISHED
            seq.num_pending = 0
        self.release_slot(group)

    def release_slot(self, group: SequenceGroup) -> None:
        if group.slot is not None:
            self.lora.release(group.slot)
            group.slot = None

    def register_full_blocks(self, seq: Sequence) -> None:
        """Offer the blocks this step filled to the prefix cache: full blocks of known tokens whose K/V are
        computed (a token still pending on the GPU cannot be hashed yet)."""
        full = min(seq.num_computed, len(seq.tokens)) // self.blocks.block_size
        if full <= seq.num_registered:
            return
        hashes = seq.hashes(self.blocks.block_size, full)
        for j in range(seq.num_registered, full):
            self.blocks.register(seq.block_table[j], hashes[j])
        seq.num_registered = full

    # ------------------------------------------------------------------------------------------- one step

    def schedule(self, skip: frozenset[int] | set[int] = frozenset(), budget: int | None = None) -> SchedulerOutput:
        """This step's work. `skip` (ids of sequences) are running elsewhere — in the asynchronous decode step
        in flight — and are neither scheduled nor preempted here; `budget` then is what that step leaves."""
        budget = self.max_batch_tokens if budget is None else budget
        out = SchedulerOutput(scheduled=[], copies=[], failed=[])
        scheduled: set[int] = set(skip)
        preempted = False
        # Decodes first (one token each), then the next chunks of unfinished prefills, so a long prompt never
        # stalls the sequences that are already generating.
        order = ([s for s in self.running if s.num_uncomputed == 1 and id(s) not in skip]
                 + [s for s in self.running if s.num_uncomputed > 1 and id(s) not in skip])
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted as a victim earlier in this loop
            n = min(seq.num_uncomputed, budget)
            copies = self._reserve(seq, n)
            while copies is None:
                # Recompute the newest sequence not yet in this step's batch (possibly seq itself).
                victim = next((s for s in reversed(self.running) if id(s) not in scheduled and s is not seq), seq)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
                copies = self._reserve(seq, n)
            if copies is None:
                continue
            out.copies += copies
            out.scheduled.append(ScheduledSeq(seq, n))
            scheduled.add(id(seq))
            budget -= n
        # Admitting under block pressure would only preempt again next step.
        if not preempted:
            self._admit(budget, out)
        return out

    def _admit(self, budget: int, out: SchedulerOutput) -> None:
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_running_seqs:
            seq = self.waiting[0]
            group = seq.group
            if group.job.adapter_key is not None and group.slot is None:
                try:
                    group.slot = self.lora.acquire(group.job.adapter_key)
                except EngineUserError as e:
                    self.waiting.popleft()
                    out.failed.append((group, e))
                    continue
                if group.slot is None:  # every slot is pinned: wait, but let other adapters' requests pass
                    skipped.append(self.waiting.popleft())
                    continue
                salt = self.lora.cache_salt(group.slot)
                if salt != group.salt:  # only before its first admission: hashes made under another salt go
                    group.salt = salt
                    for s in group.seqs:
                        s.block_hashes.clear()
            bs = self.blocks.block_size
            # Never serve the last token from cache (its logits are needed), nor a row whose logprob is wanted.
            limit = len(seq.tokens) - 1
            if seq.in_prompt_prefill and group.wants_prompt_rows:
                limit = min(limit, group.first_logprob_row)
            hit = self.blocks.lookup(seq.hashes(bs, limit // bs))
            hit_tokens = len(hit) * bs
            n = min(len(seq.tokens) - hit_tokens, budget)
            need = self.blocks.blocks_for(hit_tokens + n) - len(hit)
            if need > self.blocks.num_free - self.blocks.num_evictable_among(hit):
                if not group.started:
                    self.release_slot(group)  # don't hold a slot other requests could use meanwhile
                break
            self.waiting.popleft()
            self.blocks.take(hit)
            seq.block_table = hit + [self.blocks.allocate() for _ in range(need)]
            seq.num_registered = len(hit)
            seq.num_computed = hit_tokens
            if not group.started:
                group.cache_hit_tokens = hit_tokens
                group.started = True
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def reserve(self, seq: Sequence, n: int) -> list[tuple[int, int, int]] | None:
        return self._reserve(seq, n)

    def _reserve(self, seq: Sequence, n: int) -> list[tuple[int, int, int]] | None:
        """Blocks for positions [num_computed, num_computed + n) of a running sequence, copying a shared
        partial block first; None (and nothing changed) when the free blocks do not suffice."""
        bs = self.blocks.block_size
        need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.block_table)
        offset = seq.num_computed % bs
        cow = offset > 0 and self.blocks.ref_count(seq.block_table[seq.num_computed // bs]) > 1
        if need + int(cow) > self.blocks.num_free:
            return None
        copies: list[tuple[int, int, int]] = []
        if cow:
            j = seq.num_computed // bs
            src = seq.block_table[j]
            dst = self.blocks.allocate()
            self.blocks.free([src])
            seq.block_table[j] = dst
            copies.append((src, dst, offset))
        seq.block_table += [self.blocks.allocate() for _ in range(need)]
        return copies

    def _preempt(self, seq: Sequence) -> None:
        assert seq.num_pending == 0, "preempting a sequence with tokens still on the GPU"
        self.running.remove(seq)
        self._release_blocks(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release_blocks(self, seq: Sequence) -> None:
        if seq.block_table:
            self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = seq.num_registered = 0
