"""The sampler: requests in, one packed model forward per step, futures resolved as requests finish.

Responsibilities are split as in vLLM v1: `Scheduler` (scheduler.py) decides what runs and owns the block
bookkeeping (`BlockManager`, kv_cache.py); `LoraSlots` (lora_slots.py) keeps adapters resident; this module
validates requests, turns a schedule into one forward over the paged cache (the model-runner part), computes
logits only for the rows that need them, samples (sampling.py), applies stop rules and builds results.
Everything runs on the engine thread, so nothing here locks.

Two forward paths share everything else: the reference (plain torch: per-span attention, per-segment LoRA,
per-row generators; the CPU default) and the fast path (runner.py: paged Triton attention, gathered
multi-LoRA, fused projections, CUDA graphs for decode, batched sampling; the GPU default). Either way a step
ends with one device→host copy of the sampled tokens and their logprobs. On the fast path decode steps are
asynchronous by default on the GPU (sampler_async.py): step n+1 is launched before step n's copy is read.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinkerbell.engine import sampling
from tinkerbell.engine.batch import BatchContext, SeqSpan
from tinkerbell.engine.kv_cache import BlockManager, PagedKVCache
from tinkerbell.engine.lora import AdapterWeights, LoraBatch, LoraSegment
from tinkerbell.engine.lora_slots import LoraSlots
from tinkerbell.engine.models.llama import CausalLM
from tinkerbell.engine.runner import ModelRunner, Sampled, StepPlan
from tinkerbell.engine.sampler_async import AsyncDecoder
from tinkerbell.engine.scheduler import (ScheduledSeq, Scheduler, SeqStatus, Sequence, SequenceGroup)
from tinkerbell.engine.types import EngineUserError, SampledSequence, SampleJob, SampleResult

log = logging.getLogger("tinkerbell.engine.sampler")

MAX_NUM_SAMPLES = 128
MAX_TOPK_LOGPROBS = 20


@dataclass
class _Rows:
    """Where one scheduled sequence's logits rows sit among the rows the step computes logits for."""

    seq: Sequence
    prompt_rows: range  # prompt positions r whose row gives logprob of prompt[r + 1]
    first: int  # gathered index of the first of those rows
    sample: int | None  # gathered index of the row to sample from, if the sequence samples this step


class Sampler:
    """Multi-LoRA sampler over one base model. Besides the engine's arguments: `max_batch_tokens` is the token
    budget of one step (decode tokens + prefill chunks), `max_running_seqs` caps the running batch, `fast`
    picks the fast path (default: on CUDA), `cuda_graphs` lets it capture decode steps and `async_decode`
    launches each steady-state decode step before reading the previous one (default: on CUDA; fast path
    only; sampler_async.py)."""

    # Tensor parallel (engine/tp/executor.py): rank 0 broadcasts each planned step here before executing it,
    # so its workers run `execute` with the same plan.
    on_plan: Callable[[StepPlan, list[tuple[int, int, int]]], None] | None = None

    def __init__(self, model: CausalLM, device: torch.device, dtype: torch.dtype, max_loras: int,
                 max_lora_rank: int, block_size: int, num_blocks: int, max_context: int,
                 eos_token_ids: list[int], decode: Callable[[list[int]], str], max_batch_tokens: int = 512,
                 max_running_seqs: int = 256, fast: bool | None = None, cuda_graphs: bool = True,
                 async_decode: bool | None = None):
        self.model, self.cfg = model, model.cfg
        self.device, self.dtype = torch.device(device), dtype
        self.max_context = max_context
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.decode = decode
        cfg = self.cfg
        # Under tensor parallelism the cache holds this rank's kv heads and the slots its LoRA pieces.
        shard = getattr(model, "shard", None)
        kv_heads = shard.num_kv_heads if shard is not None else cfg.num_kv_heads
        self.kv = PagedKVCache(cfg.num_layers, num_blocks, block_size, kv_heads, cfg.head_dim, dtype,
                               self.device)
        self.blocks = BlockManager(num_blocks, block_size)
        self.lora = LoraSlots(cfg, max_loras, max_lora_rank, dtype, self.device, shard=shard)
        self.scheduler = Scheduler(self.blocks, self.lora, max_batch_tokens, max_running_seqs)
        self.fast = self.device.type == "cuda" if fast is None else fast
        self.runner: ModelRunner | None = None
        if self.fast:
            model.fuse_projections()
            self.runner = ModelRunner(model, self.kv, self.lora, self.device, max_context, cuda_graphs)
        self._groups: dict[int, SequenceGroup] = {}
        # Request ids whose futures were cancelled (appended from the cancelling thread; deque appends are
        # atomic), so a step looks only at those instead of polling every live future.
        self._cancelled: deque[int] = deque()
        self._ids = itertools.count()
        self._counters = {"requests_finished": 0, "requests_failed": 0, "tokens_generated": 0,
                          "tokens_computed": 0, "prefix_cache_hit_tokens": 0, "steps": 0}
        # Asynchronous decode (sampler_async.py): on by default on the GPU's fast path; tests force it on
        # the CPU. Never under tensor parallelism (see _async_on).
        self.async_decode = (self.device.type == "cuda") if async_decode is None else async_decode
        self._async = AsyncDecoder(self)

    # ------------------------------------------------------------------------------------------- adapters

    def register_adapter(self, key: str, source: AdapterWeights | Path) -> None:
        """In-memory weights (copied now, so the trainer may keep training) or a PEFT checkpoint folder (read
        on first use). Registering an existing key replaces it; requests already running keep the old weights."""
        self.lora.register(key, source)

    def unregister_adapter(self, key: str) -> bool:
        return self.lora.unregister(key)

    # ------------------------------------------------------------------------------------------- requests

    def add_request(self, job: SampleJob, fut: Future) -> None:
        self._validate(job)
        prompt = [int(t) for t in job.prompt]
        p = len(prompt)
        wants_prompt = job.prompt_logprobs or job.topk_prompt_logprobs > 0
        first_pos = 1 if job.prompt_logprobs_last_n is None else max(1, p - job.prompt_logprobs_last_n)
        stop_ids = set(int(t) for t in job.stop_token_ids)
        if job.stop_at_eos:
            stop_ids |= self.eos_token_ids
        group = SequenceGroup(
            request_id=next(self._ids), job=job, future=fut,
            params=sampling.SamplingParams(float(job.temperature), int(job.top_k), float(job.top_p)),
            first_logprob_row=first_pos - 1 if wants_prompt else p,
            stop_ids=frozenset(stop_ids),
            on_token=job.on_token,
        )
        if job.prompt_logprobs:
            group.prompt_logprobs = np.full(p, np.nan, dtype=np.float32)
        if job.topk_prompt_logprobs:
            group.topk_prompt_ids, group.topk_prompt_logprobs = sampling.empty_topk(p, job.topk_prompt_logprobs)
        group.seqs.append(self._new_seq(group, 0, prompt))
        self._groups[group.request_id] = group
        rid = group.request_id
        fut.add_done_callback(lambda f: self._cancelled.append(rid) if f.cancelled() else None)
        self.scheduler.add(group.seqs[0])

    def _new_seq(self, group: SequenceGroup, index: int, tokens: list[int]) -> Sequence:
        if self.fast:
            gen, seed = None, sampling.derive_seed(group.job.seed, index)
        else:
            gen, seed = sampling.make_generator(group.job.seed, index, self.device), 0
        return Sequence(seq_id=next(self._ids), group=group, sample_index=index, tokens=list(tokens), generator=gen,
                        seed=seed)

    def _validate(self, job: SampleJob) -> None:
        def bad(msg: str) -> EngineUserError:
            return EngineUserError(msg)

        vocab = self.cfg.vocab_size
        if not job.prompt:
            raise bad("prompt: must contain at least one token")
        lo, hi = min(job.prompt), max(job.prompt)
        if lo < 0 or hi >= vocab:
            tok = lo if lo < 0 else hi
            raise bad(f"prompt: token id {tok} is outside the vocabulary [0, {vocab})")
        if not 1 <= job.num_samples <= MAX_NUM_SAMPLES:
            raise bad(f"num_samples: must be between 1 and {MAX_NUM_SAMPLES}, got {job.num_samples}")
        if job.max_tokens < 1:
            raise bad(f"max_tokens: must be at least 1, got {job.max_tokens}")
        p = len(job.prompt)
        if p + job.max_tokens > self.max_context:
            raise bad(f"max_tokens: prompt length {p} + max_tokens {job.max_tokens} = {p + job.max_tokens} "
                      f"exceeds the model's context limit of {self.max_context} tokens")
        if self.blocks.blocks_for(p + job.max_tokens) > self.blocks.num_blocks:
            raise bad(f"max_tokens: prompt length {p} + max_tokens {job.max_tokens} does not fit the KV cache "
                      f"({self.blocks.num_blocks * self.blocks.block_size} tokens)")
        if not math.isfinite(job.temperature) or job.temperature < 0:
            raise bad(f"temperature: must be a finite number >= 0, got {job.temperature}")
        if not math.isfinite(job.top_p) or not 0 < job.top_p <= 1:
            raise bad(f"top_p: must be in (0, 1], got {job.top_p}")
        if job.top_k != -1 and job.top_k < 1:
            raise bad(f"top_k: must be -1 (no limit) or at least 1, got {job.top_k}")
        k_max = min(MAX_TOPK_LOGPROBS, vocab)
        for name in ("topk_sample_logprobs", "topk_prompt_logprobs"):
            k = getattr(job, name)
            if not 0 <= k <= k_max:
                raise bad(f"{name}: must be between 0 and {k_max}, got {k}")
        if job.prompt_logprobs_last_n is not None and job.prompt_logprobs_last_n < 0:
            raise bad(f"prompt_logprobs_last_n: must be >= 0, got {job.prompt_logprobs_last_n}")
        if any(not s for s in job.stop_strings):
            raise bad("stop_strings: stop strings must not be empty")
        if job.adapter_key is not None and not self.lora.has(job.adapter_key):
            raise bad(f"adapter_key: unknown adapter {job.adapter_key!r}")

    # ------------------------------------------------------------------------------------------- the loop

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._async.inflight is not None

    def _async_on(self) -> bool:
        # Tensor-parallel workers run rank 0's plans (on_plan), and a plan whose input ids live on rank 0's
        # GPU is not one they can run: TP decodes synchronously.
        return self.async_decode and self.fast and self.on_plan is None

    def step(self) -> None:
        """One scheduler iteration: schedule, one packed forward, sample, retire finished requests. With a
        decode step in flight (asynchronous decode) it launches the next one first, then reads that one."""
        self._reap_cancelled()
        if self._async.inflight is not None:
            self._async.advance()
            return
        self.step_scheduled()

    def step_scheduled(self, skip: frozenset[int] | set[int] = frozenset(), budget: int | None = None) -> None:
        """A step of the scheduler's choosing, read before returning unless it can be left in flight (a pure
        decode step, asynchronous decode on, nothing else in flight). `skip`/`budget`: see Scheduler.schedule
        (the asynchronous loop runs admissions and prefill chunks this way beside its decode step)."""
        out = self.scheduler.schedule(skip, budget)
        for group, exc in out.failed:
            self._fail_group(group, exc)
        if not out.scheduled:
            return
        self._counters["steps"] += 1
        plan, rows = self._plan(out.scheduled)
        if self.on_plan is not None:
            self.on_plan(plan, out.copies)
        with torch.inference_mode():
            logits = self.execute(plan, out.copies)
            # Logprobs as logits - logsumexp, formed only for the rows that need them (never a [R, V] copy).
            lse = logits.logsumexp(dim=-1)
            defer = self._async.deferrable(out.scheduled, rows) if not skip and self._async_on() else []
            if any(defer):
                # Its decode rows stay in flight (the asynchronous loop starts); the rest is read now.
                later = [(item, r) for item, r, d in zip(out.scheduled, rows, defer) if d]
                now = [(item, r) for item, r, d in zip(out.scheduled, rows, defer) if not d]
                self._async.launch_scheduled([i for i, _ in later], [r.sample for _, r in later], logits, lse)
                if now:
                    self._postprocess([i for i, _ in now], [r for _, r in now], logits, lse)
            else:
                self._postprocess(out.scheduled, rows, logits, lse)

    def execute(self, plan: StepPlan, copies: list[tuple[int, int, int]]) -> torch.Tensor:
        """The step's only work on model tensors: KV prefix copies, then one forward → float32 logits of the
        plan's gathered rows. Tensor-parallel workers run exactly this with rank 0's plan."""
        for src, dst, n in copies:
            self.kv.copy_prefix(src, dst, n)
        # lm_head only over the rows that sample or score a prompt token, never every prefill row.
        return self.runner.logits(plan) if self.runner is not None else self._reference_logits(plan)

    def execute_sampled(self, plan: StepPlan, copies: list[tuple[int, int, int]]) -> Sampled | None:
        """`execute` for a decode plan whose rows carry their sampling inputs, sampled inside the runner's
        graph; None (and nothing run) where the runner cannot (reference path, no graphs, too many rows)."""
        if self.runner is None or not self.runner.samples(plan):
            return None
        for src, dst, n in copies:
            self.kv.copy_prefix(src, dst, n)
        return self.runner.sample_decode(plan)

    def _plan(self, scheduled: list[ScheduledSeq]) -> tuple[StepPlan, list[_Rows]]:
        bs = self.blocks.block_size
        plan = StepPlan()
        rows: list[_Rows] = []
        for item in scheduled:
            seq, n = item.seq, item.num_tokens
            c0, c1, start = seq.num_computed, seq.num_computed + n, len(plan.ids)
            plan.ids += seq.tokens[c0:c1]
            table = seq.block_table
            plan.slots += [table[p // bs] * bs + p % bs for p in range(c0, c1)]
            plan.spans.append(SeqSpan(start=start, length=n, context_len=c1, block_table=table))
            group = seq.group
            slot = -1 if group.slot is None else group.slot
            plan.token_lora += [slot] * n
            prompt_rows = range(0)
            if seq.in_prompt_prefill and group.wants_prompt_rows:
                prompt_rows = range(max(c0, group.first_logprob_row), min(c1, group.prompt_len - 1))
            first = len(plan.gathered)
            plan.gathered += [start + r - c0 for r in prompt_rows]
            sample = None
            if c1 == len(seq.tokens):
                sample = len(plan.gathered)
                plan.gathered.append(start + n - 1)
            plan.gathered_lora += [slot] * (len(plan.gathered) - first)
            rows.append(_Rows(seq, prompt_rows, first, sample))
        return plan, rows

    def _reference_logits(self, plan: StepPlan) -> torch.Tensor:
        dev = self.device
        ctx = BatchContext(spans=plan.spans, kv_cache=self.kv,
                           slot_mapping=torch.tensor(plan.slots, dtype=torch.long, device=dev),
                           lora=self._segments(plan.token_lora))
        hidden = self.model.hidden_states(torch.tensor(plan.ids, dtype=torch.long, device=dev), ctx)
        head_ctx = BatchContext(spans=[], lora=self._segments(plan.gathered_lora))
        return self.model.logits(hidden[torch.tensor(plan.gathered, dtype=torch.long, device=dev)], head_ctx).float()

    def _segments(self, row_slots: list[int]) -> LoraBatch | None:
        """The segment loop's form of per-row slots: one segment per run of rows with the same adapter."""
        segments: list[LoraSegment] = []
        for slot, run in itertools.groupby(enumerate(row_slots), key=lambda x: x[1]):
            idx = [i for i, _ in run]
            if slot >= 0:
                segments.append(LoraSegment(idx[0], idx[-1] + 1, self.lora.weights(slot)))
        return LoraBatch(segments) if segments else None

    def _postprocess(self, scheduled: list[ScheduledSeq], rows: list[_Rows], logits: torch.Tensor,
                     lse: torch.Tensor) -> None:
        draws: list[tuple[Sequence, int]] = []
        for item, r in zip(scheduled, rows):
            seq, group = item.seq, item.seq.group
            seq.num_computed += item.num_tokens
            self._counters["tokens_computed"] += item.num_tokens
            self.scheduler.register_full_blocks(seq)
            if len(r.prompt_rows):
                self._record_prompt_logprobs(group, r, logits, lse)
            if r.sample is None:
                continue
            if not group.prefilled:
                # The prompt is prefilled once; every sample starts from its last row and shares its blocks.
                children = [self._new_seq(group, i, seq.tokens) for i in range(1, group.job.num_samples)]
                group.seqs += children
                if children:
                    self.scheduler.fork(seq, children)
                group.prefilled = True
                draws += [(s, r.sample) for s in [seq, *children]]
            else:
                draws.append((seq, r.sample))
        if not draws:
            return
        picks = [g for _, g in draws]
        if picks == list(range(logits.shape[0])):  # every row draws once, in order (decode): no gather copy
            drawn, drawn_lse = logits, lse
        else:
            index = torch.tensor(picks, dtype=torch.long).to(logits.device, non_blocking=True)
            drawn, drawn_lse = logits[index], lse[index]
        params = [s.group.params for s, _ in draws]
        if self.fast:
            tokens = sampling.sample_fast(drawn, params, [s.seed for s, _ in draws], [len(s.tokens) for s, _ in draws])
        else:
            tokens = sampling.sample(drawn, params, [s.generator for s, _ in draws])
        token_lps = drawn.gather(-1, tokens[:, None]).squeeze(-1) - drawn_lse
        k_max = max(s.group.job.topk_sample_logprobs for s, _ in draws)
        topk_ids = topk_lps = None
        if k_max:
            topk_ids, topk_lps = sampling.topk(drawn, k_max, drawn_lse)
        # The step's one device→host copy: token ids (exact in float64) and their logprobs together.
        host = torch.stack([tokens.double(), token_lps.double()]).cpu()
        tokens_l, lps_l = host[0].long().tolist(), host[1].tolist()
        for i, (seq, _) in enumerate(draws):
            self._append(seq, tokens_l[i], lps_l[i], topk_ids[i] if topk_ids is not None else None,
                         topk_lps[i] if topk_lps is not None else None)

    def _record_prompt_logprobs(self, group: SequenceGroup, r: _Rows, logits: torch.Tensor,
                                lse: torch.Tensor) -> None:
        prompt = group.job.prompt
        lo, hi = r.prompt_rows.start, r.prompt_rows.stop
        block = logits[r.first:r.first + (hi - lo)] - lse[r.first:r.first + (hi - lo), None]
        if group.prompt_logprobs is not None:
            targets = torch.tensor(prompt[lo + 1:hi + 1], dtype=torch.long, device=block.device)
            group.prompt_logprobs[lo + 1:hi + 1] = block.gather(-1, targets[:, None]).squeeze(-1).cpu().numpy()
        k = group.job.topk_prompt_logprobs
        if k:
            ids, lps = sampling.topk(block, k)
            assert group.topk_prompt_ids is not None and group.topk_prompt_logprobs is not None
            group.topk_prompt_ids[lo + 1:hi + 1] = ids
            group.topk_prompt_logprobs[lo + 1:hi + 1] = lps

    def _append(self, seq: Sequence, token: int, logprob: float, topk_ids: np.ndarray | None,
                topk_lps: np.ndarray | None) -> None:
        job = seq.group.job
        seq.tokens.append(token)
        seq.logprobs.append(logprob)
        if job.topk_sample_logprobs:
            assert topk_ids is not None and topk_lps is not None
            seq.topk_ids.append(topk_ids[:job.topk_sample_logprobs])
            seq.topk_logprobs.append(topk_lps[:job.topk_sample_logprobs])
        self._counters["tokens_generated"] += 1
        reason = self._stop_reason(seq, token)
        if seq.group.on_token is not None:
            self._stream(seq, token, logprob)
        if reason is None:
            return
        self.scheduler.finish(seq, reason)
        if seq.group.done:
            self._complete(seq.group)

    @staticmethod
    def _stream(seq: Sequence, token: int, logprob: float) -> None:
        group = seq.group
        try:
            group.on_token(seq.sample_index, token, logprob)
        except Exception:  # noqa: BLE001 - a broken consumer must not fail the batch it shares a step with
            log.exception("on_token callback of request %d failed; streaming turned off for it", group.request_id)
            group.on_token = None

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        job, group = seq.group.job, seq.group
        if token in group.stop_ids:
            return "stop"
        if job.stop_strings:
            # A stop string ending at the newest token lies within its last 4·len + 2 tokens (a token is at
            # least one byte, a character at most four), so only that tail is decoded each step.
            longest = max(len(s) for s in job.stop_strings)
            tail = seq.tokens[max(seq.num_prompt, len(seq.tokens) - 4 * longest - 2):]
            text = self.decode(tail)
            if any(s in text for s in job.stop_strings):
                return "stop"
        if seq.num_generated >= job.max_tokens or len(seq.tokens) >= self.max_context:
            return "length"
        return None

    # ------------------------------------------------------------------------------------------- results

    def _complete(self, group: SequenceGroup) -> None:
        self.scheduler.release_slot(group)
        self._groups.pop(group.request_id, None)
        self._counters["requests_finished"] += 1
        self._counters["prefix_cache_hit_tokens"] += group.cache_hit_tokens
        job = group.job
        seqs = []
        for seq in sorted(group.seqs, key=lambda s: s.sample_index):
            out = SampledSequence(tokens=seq.tokens[seq.num_prompt:], logprobs=list(seq.logprobs),
                                  stop_reason=seq.stop_reason or "length")
            if job.topk_sample_logprobs:
                out.topk_ids = np.stack(seq.topk_ids).astype(np.int32)
                out.topk_logprobs = np.stack(seq.topk_logprobs).astype(np.float32)
            seqs.append(out)
        result = SampleResult(
            sequences=seqs,
            prompt_logprobs=group.prompt_logprobs.tolist() if group.prompt_logprobs is not None else None,
            topk_prompt_ids=group.topk_prompt_ids,
            topk_prompt_logprobs=group.topk_prompt_logprobs,
            prompt_cache_hit_tokens=group.cache_hit_tokens,
        )
        settle(group.future, result=result)

    def _fail_group(self, group: SequenceGroup, exc: BaseException) -> None:
        self.scheduler.abort(group)
        self._groups.pop(group.request_id, None)
        self._counters["requests_failed"] += 1
        settle(group.future, exc=exc)

    def _reap_cancelled(self) -> None:
        while self._cancelled:
            group = self._groups.pop(self._cancelled.popleft(), None)
            if group is not None:
                self.scheduler.abort(group)

    def pending_futures(self) -> list[Future]:
        """Futures of every request admitted and not finished (thread-safe enough for a dying engine)."""
        return [g.future for g in list(self._groups.values())]

    def fail_all(self, exc: BaseException) -> None:
        """Fail every pending request and return to an empty state (all blocks free, no slot pinned). The
        prefix cache is dropped too: a step that failed half-way may have left blocks half-written."""
        groups = list(self._groups.values())
        self._groups.clear()
        self._async.drop()
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        self.blocks.reset()
        self.lora.release_all()
        for group in groups:
            group.slot = None
            for seq in group.seqs:
                seq.status, seq.block_table = SeqStatus.FINISHED, []
            self._counters["requests_failed"] += 1
            settle(group.future, exc=exc)

    def stats(self) -> dict:
        sch = self.scheduler
        return {
            "running_requests": len({s.group.request_id for s in sch.running}),
            "running_seqs": len(sch.running),
            "waiting_seqs": len(sch.waiting),
            "kv_blocks_used": self.blocks.num_used,
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_cached": self.blocks.num_cached,
            "kv_block_size": self.blocks.block_size,
            "lora_slots_total": self.lora.max_loras,
            "lora_slots_resident": self.lora.resident(),
            "lora_loads": self.lora.loads,
            "preemptions": sch.num_preemptions,
            # Asynchronous decode: steps launched before the previous one was read, sequences that joined
            # a step in flight, synchronous steps run beside one (admissions, prefill chunks).
            "async_steps": self._async.launched,
            "async_joins": self._async.joined,
            "async_side_steps": self._async.side_steps,
            **self._counters,
        }


def settle(fut: Future, result: SampleResult | None = None, exc: BaseException | None = None) -> None:
    """Set a future unless its caller already cancelled it (possible from another thread at any moment)."""
    if fut.done():
        return
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass
