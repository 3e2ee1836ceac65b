"""The engine: one thread that owns the model, the KV cache, the LoRA slots and every adapter's optimizer state.

Everything else talks to it through `submit`-style methods that return `concurrent.futures.Future`s. One loop
interleaves training jobs (run in submission order) with sampler steps (continuous batching), so sampling keeps
flowing while training runs and nothing but this thread touches model tensors.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tinkerbell.engine import gather
from tinkerbell.engine.diffusion import DiffusionSampler, RefusedTrainer
from tinkerbell.engine.lora import LoraSpec
from tinkerbell.engine.models.config import ModelConfig
from tinkerbell.engine.models.loader import load_model, load_tokenizer, read_config, resolve_model_path
from tinkerbell.engine.sampler import Sampler
from tinkerbell.engine.tp.executor import Mirror, OutOfStep, PlanChannel
from tinkerbell.engine.tp.group import TPGroup
from tinkerbell.engine.training import Trainer
from tinkerbell.engine.types import AdamParams, ForwardBackwardResult, SampleJob, SampleResult, TrainDatum

log = logging.getLogger("tinkerbell.engine")

# Forward/backward jobs (of any runs) are packed into one batch up to this many tokens; when several runs are
# waiting, each gets an equal share of a batch (at least one request), so no run waits behind another's queue.
MAX_PACKED_TRAIN_TOKENS = 16384
# On a CPU, models narrower than this run the engine thread's ops on one core (see Engine._loop).
CPU_THREADED_HIDDEN = 1024
# GPU memory left free beside the KV cache for CUDA-graph buffers (≈130 MB of logits per 256-row bucket at 128k vocab).
GRAPH_RESERVE_BYTES = 2 * 2**30


@dataclass
class _Job:
    fn: Callable[[], Any] | None
    fut: Future
    # For forward/backward jobs: (run_id, data, loss_fn, loss_config, forward_only), so the loop can pack them.
    fwdbwd: tuple | None = None
    run: str | None = None  # the training run whose order this job keeps (None: a sampler/control job)
    optim: AdamParams | None = None  # for optim_step jobs: steps of several runs due together run as one update
    arrived: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return sum(len(d.tokens) for d in self.fwdbwd[1]) if self.fwdbwd else 0


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    device: str = "auto"  # auto | cpu | cuda
    max_loras: int = 8
    max_lora_rank: int = 64
    gpu_memory_util: float = 0.4
    kv_block_size: int = 16
    max_context: int | None = None  # default: the model's max_position_embeddings, capped at 8192
    allow_download: bool = False
    # Diffusion LMs (LLaDA): default algorithm, sequences per forward, wait for a batch to fill (seconds).
    algorithm: str = "basic"
    batch_size: int = 16
    max_wait_time: float = 0.0
    dcp_path: str | None = None  # weights from a torch.distributed.checkpoint folder onto --model's architecture
    tp: int = 1  # tensor-parallel ranks: this process is rank 0, ranks 1..tp-1 are worker processes (engine/tp)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[self.dtype]


class Engine:
    def __init__(self, config: EngineConfig, tp: TPGroup | None = None, channel: PlanChannel | None = None):
        """`tp` None with `config.tp` > 1: this is rank 0; it starts the worker processes, which build the
        same Engine with their `tp` group and the reading end of rank 0's `channel`, and serve rank 0's ops
        (engine/tp/worker.py) instead of running a loop."""
        self.config = config
        self.path: Path = resolve_model_path(config.model, allow_download=config.allow_download)
        self.model_config: ModelConfig = read_config(self.path)
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        self.workers = None
        # A fatal tensor-parallel failure (a worker died, ranks out of step) ends the process by default.
        self.on_fatal: Callable[[str], None] = _exit_process
        self._current: list[_Job] = []  # the jobs the loop is running now (failed too if the group dies)
        self._fatal_lock = threading.Lock()
        self._fatal_msg: str | None = None
        if tp is None and config.tp > 1:
            from tinkerbell.engine.tp.group import init_tp
            from tinkerbell.engine.tp.launch import Workers

            self.workers = Workers(config, self._fatal)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", 0)
            tp = init_tp(0, config.tp, self.workers.init_method, self.device)
            channel = self.workers.channel
        elif tp is not None and self.device.type == "cuda":
            self.device = torch.device("cuda", tp.rank)
        self.tp = tp
        if tp is not None and self.device.type == "cpu":  # the T ranks share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp.world))
        t0 = time.perf_counter()
        if config.dcp_path:
            from tinkerbell.engine.models.dcp import load_model_from_dcp

            self.model = load_model_from_dcp(self.path, Path(config.dcp_path), self.dtype, self.device)
        else:
            self.model = load_model(self.path, self.dtype, self.device, tp=tp)
        self.tokenizer = load_tokenizer(self.path)
        self.max_context = config.max_context or min(self.model_config.max_position_embeddings, 8192)
        log.info("loaded %s (%s, %s, %s) in %.1fs", config.model, self.model_config.arch, self.dtype,
                 self.device, time.perf_counter() - t0)
        diffusion = self.model_config.is_diffusion
        # Diffusion LMs sample only: the trainer refuses with a user error, the sampler is the diffusion one.
        self.trainer = RefusedTrainer() if diffusion else Trainer(self.model, device=self.device, tp=tp)
        self.sampler = self._diffusion_sampler() if diffusion else Sampler(
            self.model,
            device=self.device,
            dtype=self.dtype,
            max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank,
            block_size=config.kv_block_size,
            num_blocks=self._kv_blocks(),
            max_context=self.max_context,
            eos_token_ids=self.eos_token_ids(),
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False),
        )
        # Every op that touches model tensors goes through the mirror: on rank 0 of a TP group it broadcasts
        # the op to the workers first (engine/tp/executor.py); otherwise it just applies it.
        self.mirror = Mirror(self.trainer, self.sampler, tp, channel)
        if tp is not None:
            self.mirror.sync_memory_plan()
            self._log_memory()
        # Jobs of no run (sampler admission, adapter registration) run first, in arrival order; each training
        # run has its own queue, kept in order, and runs take turns (insertion order = rotation order).
        self._jobs: deque[_Job] = deque()
        self._runs: dict[str, deque[_Job]] = {}
        self._wake = threading.Condition()
        self._train_batches = 0  # packed forward/backward passes run (one may serve many requests)
        self._loop_seconds: dict[str, float] = {"waiting": 0.0, "training": 0.0, "other_jobs": 0.0, "sampling": 0.0,
                                                "sampler_steps": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tinkerbell-engine", daemon=True)
        if tp is None or tp.leader:  # a worker serves rank 0's ops instead (engine/tp/worker.py)
            self._thread.start()

    def _diffusion_sampler(self) -> DiffusionSampler:
        cfg = self.config
        return DiffusionSampler(self.model, device=self.device, dtype=self.dtype, eos_token_ids=self.eos_token_ids(),
                                decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False),
                                max_context=self.max_context, algorithm=cfg.algorithm, batch_size=cfg.batch_size,
                                max_wait_time=cfg.max_wait_time, memory_bytes=self._sampler_budget())

    # ------------------------------------------------------------------------------------------- metadata

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def eos_token_ids(self) -> list[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)

    def _sampler_budget(self) -> int | None:
        """GPU memory for the sampler's state (the AR sampler's KV cache, the diffusion rows' caches): a
        `--gpu-memory-util` share of what is free now, leaving room for the CUDA graphs' buffers and the logits.
        None on the CPU (no budget: the caller picks a fixed one or none)."""
        if self.device.type != "cuda":
            return None
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(min(free * self.config.gpu_memory_util, free - GRAPH_RESERVE_BYTES))

    def _kv_blocks(self) -> int:
        bs = self.config.kv_block_size
        cfg = self.model_config
        # Under TP each rank caches only its KV heads (engine/tp/shard.py: split, or one replicated).
        shard = getattr(self.model, "shard", None)
        kv_heads = shard.num_kv_heads if shard is not None else cfg.num_kv_heads
        per_token = 2 * cfg.num_layers * kv_heads * cfg.head_dim * torch.finfo(self.dtype).bits // 8
        budget = self._sampler_budget()
        if budget is None:
            budget = 512 * 2**20  # CPU: a fixed 512 MiB of KV is plenty for the tiny models CPUs serve
        blocks = max(budget // (per_token * bs), 2 * (self.max_context // bs + 1))
        if self.tp is not None:  # every rank must hold the same blocks: the scheduler plans for all of them
            t = torch.tensor([blocks], dtype=torch.int64, device=self.device)
            self.tp.all_reduce_(t, op=torch.distributed.ReduceOp.MIN)
            blocks = int(t.item())
        log.info("KV cache: %d blocks of %d tokens (%d tokens, %.0f MiB)", blocks, bs, blocks * bs,
                 blocks * bs * per_token / 2**20)
        return int(blocks)

    # ------------------------------------------------------------------------------------------- the loop

    def _enqueue(self, job: _Job) -> Future:
        with self._wake:
            if job.run is None:
                self._jobs.append(job)
            else:
                self._runs.setdefault(job.run, deque()).append(job)
            self._wake.notify()
        return job.fut

    def _call(self, fn: Callable[[], Any], run: str | None = None) -> Future:
        return self._enqueue(_Job(fn, Future(), run=run))

    def _next_jobs(self) -> list[_Job]:
        """The next job: a control job, or the next run's non-packable job, or a packed forward/backward batch
        taking an equal share of tokens from every run whose queue starts with forward/backward work."""
        with self._wake:
            if not self._jobs and not self._runs and not self.sampler.has_work():
                self._wake.wait(timeout=0.05)
            if self._jobs:
                return [self._jobs.popleft()]
            if not self._runs:
                return []
            first = next(iter(self._runs))
            if self._runs[first][0].optim is not None:  # every run whose turn is an optim_step: one update
                batch = [q.popleft() for q in self._runs.values() if q[0].optim is not None]
            elif self._runs[first][0].fwdbwd is None:  # save, load, ...: alone, in its run's order
                batch = [self._runs[first].popleft()]
            else:
                ready = [r for r, q in self._runs.items() if q[0].fwdbwd is not None]
                left = self._gather_left(ready)
                if left > 0:  # more users' forward/backward may be on their way: one packed pass for all
                    self._wake.wait(timeout=left)
                    return []
                share = MAX_PACKED_TRAIN_TOKENS // len(ready)
                batch, tokens = [], 0
                for run in ready:
                    q, taken = self._runs[run], 0
                    while q and q[0].fwdbwd is not None and tokens + q[0].tokens <= MAX_PACKED_TRAIN_TOKENS:
                        if taken and taken + q[0].tokens > share:
                            break
                        job = q.popleft()
                        batch.append(job)
                        taken += job.tokens
                        tokens += job.tokens
                    if not batch:  # one request larger than a batch still runs, alone
                        batch.append(q.popleft())
                        break
            # Rotate: the run that went first goes to the back; drained runs leave the rotation.
            self._runs[first] = self._runs.pop(first)
            for run in [r for r, q in self._runs.items() if not q]:
                del self._runs[run]
            return batch

    def _gather_left(self, ready: list[str]) -> float:
        """How long an otherwise idle engine should wait for the rest of a burst of forward/backward requests
        (gather.py); <= 0 when every run has one pending (nobody else to wait for: a lone user never waits), the
        sampler has work (its steps leave time for arrivals) or a batch is full."""
        if len(ready) >= self.trainer.stats().get("runs", 0) or self.sampler.has_work():
            return 0.0
        heads = [self._runs[r][0] for r in ready]
        if sum(j.tokens for j in heads) >= MAX_PACKED_TRAIN_TOKENS:
            return 0.0
        arrived = [j.arrived for j in heads]
        return gather.wait_left(time.monotonic(), min(arrived), max(arrived))

    def _run_jobs(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if j.fut.set_running_or_notify_cancel()]
        if not live:
            return
        self._current = live
        if live[0].optim is not None:
            self._run_optim(live)
            return
        if live[0].fwdbwd is None:
            self._settle(live[0].fut, live[0].fn)
            return
        # Validate each request on its own (a bad one fails alone), then one packed forward/backward.
        segments, owners = [], []
        for job in live:
            try:
                segments.append(self.trainer.prepare(*job.fwdbwd))
                owners.append(job)
            except Exception as e:  # noqa: BLE001
                job.fut.set_exception(e)
        if not segments:
            return
        self._train_batches += 1
        try:
            results = self.mirror.fwdbwd(segments, [j.fwdbwd for j in owners])
        except OutOfStep as e:
            self._fatal(str(e))
            return
        except Exception as e:  # noqa: BLE001
            log.exception("packed forward/backward failed")
            for job in owners:
                job.fut.set_exception(e)
            return
        for job, res in zip(owners, results):
            job.fut.set_result(res)

    def _run_optim(self, jobs: list[_Job]) -> None:
        """AdamW steps of several runs in one fused update; a refused step fails its own future only."""
        try:
            results = self.mirror.run("optims", [(j.run, j.optim) for j in jobs])
        except OutOfStep as e:
            self._fatal(str(e))
            return
        except Exception as e:  # noqa: BLE001
            if not isinstance(e, ValueError):
                log.exception("optimizer step failed")
            for job in jobs:
                job.fut.set_exception(e)
            return
        for job, res in zip(jobs, results):
            if isinstance(res, Exception):
                job.fut.set_exception(res)
            else:
                job.fut.set_result(res)

    def _settle(self, fut: Future, fn: Callable[[], Any]) -> None:
        try:
            fut.set_result(fn())
        except OutOfStep as e:
            self._fatal(str(e))
        except BaseException as e:  # noqa: BLE001 - every failure goes to its future
            if not isinstance(e, ValueError):
                log.exception("engine job failed")
            fut.set_exception(e)

    def _loop(self) -> None:
        if self.device.type == "cpu" and self.tp is None and self.model_config.hidden_size < CPU_THREADED_HIDDEN:
            # Off the main thread every OpenMP parallel region pays a worker wake-up (~60 µs on a 2-core box,
            # measured: a 4×128 @ 128×256 linear 10 µs on the main thread, 65 µs on another, 7 µs with one
            # thread), which a small model's ops never earn back: this thread runs them on one core.
            torch.set_num_threads(1)
        clock = self._loop_seconds
        while not self._stop.is_set():
            # One training/control job (or one packed training batch) per iteration, then one sampler step:
            # neither starves the other.
            t0 = time.perf_counter()
            jobs = self._next_jobs()
            t1 = time.perf_counter()
            self._run_jobs(jobs)
            self._current = []
            t2 = time.perf_counter()
            clock["waiting"] += t1 - t0
            if jobs:
                clock["training" if jobs[0].fwdbwd is not None or jobs[0].optim is not None
                      else "other_jobs"] += t2 - t1
            if self.sampler.has_work():
                clock["sampler_steps"] += 1
                try:
                    self.sampler.step()
                except BaseException as e:  # noqa: BLE001
                    if self.mirror.broadcasts:  # the workers may be inside the step's collectives
                        self._fatal(f"sampler step failed on rank 0 ({type(e).__name__}: {e}); the "
                                    "tensor-parallel ranks are out of step")
                        return
                    log.exception("sampler step failed; failing its running requests")
                    self.sampler.fail_all(RuntimeError("sampler step failed; see the server log"))
                clock["sampling"] += time.perf_counter() - t2
        self.mirror.stop()

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.workers is not None:
            self.workers.stop()

    # ------------------------------------------------------------------------------------------- TP

    def _fatal(self, msg: str) -> None:
        """The TP group is broken (a worker died, or ranks are out of step): fail every pending future with a
        message saying why, then `on_fatal` (default: exit the process non-zero; it must not hang). Called by
        the worker monitor and by the engine thread (whose collective fails when a peer dies): once."""
        if self.workers is not None and "exited with code" not in msg:
            # A failed collective is usually a dead peer: name it rather than the socket error it caused.
            msg = self.workers.death_message(timeout=2.0) or msg
        with self._fatal_lock:
            if self._fatal_msg is not None:
                return
            self._fatal_msg = msg
        log.critical("%s; failing every pending request", msg)
        exc = RuntimeError(f"{msg}. The server is stopping; see its log.")
        # (A worker may die while this engine is still being built: only what exists yet can be failed.)
        runs = getattr(self, "_runs", {})
        jobs = list(self._current) + list(getattr(self, "_jobs", ())) + [j for q in list(runs.values()) for j in q]
        pending = getattr(getattr(self, "sampler", None), "pending_futures", None)  # diffusion: never under TP
        futs = [j.fut for j in jobs] + (pending() if pending is not None else [])
        for fut in futs:
            if not fut.done():
                try:
                    fut.set_exception(exc)
                except Exception:  # noqa: BLE001 - cancelled or settled meanwhile
                    pass
        self.on_fatal(msg)

    def _log_memory(self) -> None:
        rank = self.tp.rank if self.tp is not None else 0
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters()) / 2**20
        kv = getattr(self.sampler, "kv", None)
        kv_mib = sum(t.numel() * t.element_size() for t in [*kv.k, *kv.v]) / 2**20 if kv is not None else 0.0
        line = f"tp rank {rank}/{self.config.tp}: weights {weights:.0f} MiB, KV cache {kv_mib:.0f} MiB"
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            line += f", GPU {self.device.index}: {(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB in use"
        log.info(line)

    # ------------------------------------------------------------------------------------------- training

    def create_adapter(self, run_id: str, spec: LoraSpec, seed: int | None) -> Future:
        return self._call(lambda: self.mirror.run("create", run_id, spec, seed), run_id)

    def forward_backward(self, run_id: str, data: list[TrainDatum], loss_fn: str, loss_config: dict[str, float],
                         forward_only: bool) -> "Future[ForwardBackwardResult]":
        return self._enqueue(_Job(None, Future(), (run_id, data, loss_fn, loss_config, forward_only), run_id))

    def optim_step(self, run_id: str, params: AdamParams) -> "Future[dict[str, float]]":
        return self._enqueue(_Job(None, Future(), run=run_id, optim=params))

    def save_adapter(self, run_id: str, out_dir: Path, with_optimizer: bool) -> "Future[int]":
        """Write the run's adapter (PEFT format) and optionally its optimizer state; returns bytes written."""
        return self._call(lambda: self.mirror.run("save", run_id, out_dir, with_optimizer, self.config.model),
                          run_id)

    def load_adapter(self, run_id: str, src_dir: Path, with_optimizer: bool) -> "Future[LoraSpec]":
        """Create run `run_id` from a saved checkpoint (weights, and Adam state if asked)."""
        return self._call(lambda: self.mirror.run("load", run_id, src_dir, with_optimizer), run_id)

    def drop_adapter(self, run_id: str) -> Future:
        return self._call(lambda: self.mirror.run("remove", run_id), run_id)

    def publish_to_sampler(self, run_id: str, adapter_key: str) -> Future:
        """Hand the run's current weights to the sampler under `adapter_key`: an in-memory copy, no disk."""
        return self._call(lambda: self.mirror.run("publish", run_id, adapter_key), run_id)  # after earlier steps

    # ------------------------------------------------------------------------------------------- sampling

    def register_checkpoint(self, adapter_key: str, src_dir: Path) -> Future:
        """Make a saved adapter samplable under `adapter_key` (loaded into a slot lazily, on first use)."""
        return self._call(lambda: self.mirror.run("register", adapter_key, src_dir))

    def unregister_adapter(self, adapter_key: str) -> "Future[bool]":
        """Forget `adapter_key` (False if unknown); requests already running keep their weights."""
        return self._call(lambda: self.mirror.run("unregister", adapter_key))

    def sample(self, job: SampleJob) -> "Future[SampleResult]":
        fut: Future = Future()

        def add() -> None:
            self.sampler.add_request(job, fut)

        # Admission happens on the engine thread; errors in validation fail `fut` directly.
        inner = self._call(add)
        inner.add_done_callback(lambda f: f.exception() and not fut.done() and fut.set_exception(f.exception()))
        return fut

    def stats(self) -> dict[str, Any]:
        return {"sampler": self.sampler.stats(), "trainer": self.trainer.stats(),
                "queued_jobs": len(self._jobs) + sum(len(q) for q in self._runs.values()),
                "train_batches": self._train_batches,
                # Where the engine thread's time went (host seconds): what a loop mixing users' training and
                # sampling waits on. `waiting` is time with nothing to do.
                "loop_seconds": {k: round(v, 6) for k, v in self._loop_seconds.items()}}



def _exit_process(msg: str) -> None:
    """A replica with a broken TP group can only hang: exit non-zero (the router or operator restarts it)."""
    logging.shutdown()
    time.sleep(0.5)  # let futures' callbacks hand their errors to waiting clients
    os._exit(1)
