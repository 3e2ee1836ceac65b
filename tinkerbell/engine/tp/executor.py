"""Mirroring the engine's model-touching operations onto tensor-parallel workers.

Rank 0 (the API process's engine thread) is the only rank that plans: it validates requests, schedules sampler
steps and picks LoRA slots. Every operation that touches model tensors goes through `Mirror.run`, which
broadcasts it once and then applies it locally; each worker receives the same message and applies it to its own
shard (worker.py). Since every rank starts from the same state and applies the same operations in the same
order, every collective inside them lines up.

The broadcast is one pickle written to one pipe per worker (`PlanChannel`), not a gloo collective: a decode
step's plan must cost rank 0 microseconds, and `broadcast_object_list` (two gloo round trips) cost ~1 ms for a
64-sequence plan on a loaded CPU. A pipe also tells a worker at once that rank 0 is gone (EOF). Plans travel as
plain tuples (dataclass pickling is several times slower).

A message is `(slot_loads, (name, args))`: the LoRA slot loads rank 0's scheduler made since the previous
message (a slot may be loaded for a request that is then not scheduled), then the operation. Ops:

    create (run_id, spec, seed)              load (run_id, src_dir, with_optimizer)
    save (run_id, out_dir, with_opt, base)   remove (run_id)
    fwdbwd ([(run_id, data, loss_fn, loss_config, forward_only), ...])   (already validated on rank 0)
    optim (run_id, params)                   publish (run_id, adapter_key)
    optims ([(run_id, params), ...])
    register (adapter_key, src_dir)          unregister (adapter_key)
    step (plan, copies)                      stop ()

User errors (EngineUserError, any ValueError) are deterministic given the same state and arguments, so every
rank raises them alike and they go back to the caller; any other failure leaves the ranks out of step and is
fatal (the engine exits loudly rather than hang in a collective).
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import random
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

from tinkerbell.engine.batch import SeqSpan
from tinkerbell.engine.runner import StepPlan
from tinkerbell.engine.tp.group import TPGroup

if TYPE_CHECKING:
    from tinkerbell.engine.sampler import Sampler
    from tinkerbell.engine.training import Trainer

log = logging.getLogger("tinkerbell.engine.tp")

STOP = "stop"


_PLAN_FIELDS = [f.name for f in dataclasses.fields(StepPlan)]
_SPAN_FIELDS = [f.name for f in dataclasses.fields(SeqSpan)]


def pack_plan(plan: StepPlan) -> list:
    return [[tuple(getattr(sp, n) for n in _SPAN_FIELDS) for sp in plan.spans] if n == "spans" else getattr(plan, n)
            for n in _PLAN_FIELDS]


def unpack_plan(packed: list) -> StepPlan:
    kw = dict(zip(_PLAN_FIELDS, packed))
    kw["spans"] = [SeqSpan(*t) for t in kw["spans"]]
    return StepPlan(**kw)


class PlanChannel:
    """Rank 0 → workers, one way: `send` on rank 0 (one write per worker), `recv` on a worker (EOFError once
    rank 0 is gone)."""

    def __init__(self, writers: list[Connection] | None = None, reader: Connection | None = None):
        self.writers, self.reader = writers or [], reader
        for w in self.writers:
            _grow_pipe(w)

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        for w in self.writers:
            w.send_bytes(data)

    def recv(self) -> Any:
        assert self.reader is not None
        return pickle.loads(self.reader.recv_bytes())


def _grow_pipe(conn: Connection, size: int = 2**20) -> None:
    """Linux: a 1 MiB pipe buffer (default 64 KiB), so rank 0 never waits for a worker to read the plan of a
    long-context batch (~100 KB at 64 sequences of 8k tokens) before launching its own forward."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (ImportError, OSError):
        pass  # not Linux, or above /proc/sys/fs/pipe-max-size: the default buffer works, a little slower


class OutOfStep(RuntimeError):
    """A rank failed part-way through a mirrored operation: the group can no longer agree on collectives."""


class Mirror:
    """One rank's view of the mirrored operations: `run` on rank 0 (broadcast, then apply), `serve` on workers
    (receive, apply, until stop). With `tp` None (the plain path) or a group of one, `run` only applies."""

    def __init__(self, trainer: "Trainer", sampler: "Sampler", tp: TPGroup | None,
                 channel: PlanChannel | None = None):
        self.trainer, self.sampler, self.tp, self.channel = trainer, sampler, tp, channel
        self.broadcasts = bool(tp is not None and tp.world > 1)
        assert not self.broadcasts or channel is not None, "a TP group of several ranks needs its plan channel"
        lora = getattr(sampler, "lora", None)
        if self.broadcasts and tp is not None and tp.leader and lora is not None:
            lora.load_log = []
            sampler.on_plan = self._send_step
        self._ops: dict[str, Callable[..., Any]] = {
            "create": trainer.create, "load": trainer.load, "save": trainer.save, "remove": trainer.remove,
            "fwdbwd": self._fwdbwd, "optim": trainer.optim_step, "optims": trainer.optim_steps,
            "publish": self._publish,
            "register": sampler.register_adapter, "unregister": sampler.unregister_adapter,
            "step": self._step,
        }

    # ------------------------------------------------------------------------------------------- rank 0

    def run(self, name: str, *args: Any) -> Any:
        """Apply op `name` on every rank (rank 0's result is returned). Rank 0's engine thread only."""
        if name == "create" and args[2] is None and self.tp is not None:
            # Every rank must initialise the same full adapter before sharding it: rank 0 draws the seed.
            args = (args[0], args[1], random.SystemRandom().randrange(2**31))
        if self.broadcasts:
            self._send((name, args))
        return self.apply(name, args)

    def fwdbwd(self, segments: list, requests: list[tuple]) -> list:
        """A packed forward/backward of `segments`, which rank 0 already validated from `requests` (the raw
        job arguments the workers prepare again: their state is the same, so they pass too)."""
        if self.broadcasts:
            self._send(("fwdbwd", (requests,)))
        return self._guarded("fwdbwd", self.trainer.run_segments, (segments,))

    def stop(self) -> None:
        """Tell the workers to exit cleanly (rank 0's engine thread, after its last op)."""
        if self.broadcasts:
            self._send((STOP, ()))

    def _send(self, op: tuple[str, tuple]) -> None:
        assert self.tp is not None and self.tp.leader and self.channel is not None
        lora = self.sampler.lora
        loads, lora.load_log = lora.load_log or [], []
        self.channel.send((loads, op))

    def _send_step(self, plan: StepPlan, copies: list[tuple[int, int, int]]) -> None:
        """The sampler's hook: called after rank 0 planned a step and before it executes it."""
        self._send(("step", (pack_plan(plan), copies)))

    # ------------------------------------------------------------------------------------------- every rank

    def apply(self, name: str, args: tuple) -> Any:
        return self._guarded(name, self._ops[name], args)

    def _guarded(self, name: str, fn: Callable[..., Any], args: tuple) -> Any:
        try:
            return fn(*args)
        except ValueError:
            raise  # a user error: every rank raises it alike, before or after the same collectives
        except BaseException as e:
            if self.broadcasts:
                raise OutOfStep(f"tensor-parallel rank {self.tp.rank if self.tp else 0} failed in {name!r}: "
                                f"{type(e).__name__}: {e}") from e
            raise

    def serve(self) -> None:
        """A worker's loop: apply rank 0's messages until it says stop. Raises when rank 0 is gone."""
        assert self.tp is not None and not self.tp.leader and self.channel is not None
        while True:
            loads, (name, args) = self.channel.recv()
            for slot, key in loads:
                self.sampler.lora.load_as(slot, key)
            if name == STOP:
                return
            try:
                self.apply(name, args)
            except ValueError as e:  # rank 0 raised the same and answered its caller
                log.debug("rank %d: %s refused as on rank 0: %s", self.tp.rank, name, e)

    # ------------------------------------------------------------------------------------------- ops

    def _fwdbwd(self, requests: list[tuple]) -> list:
        segments = [self.trainer.prepare(*r) for r in requests]
        return self.trainer.run_segments(segments)

    def _publish(self, run_id: str, adapter_key: str) -> None:
        # The snapshot is a fresh copy nobody else holds: the slots take it as is (no second copy).
        self.sampler.lora.register(adapter_key, self.trainer.snapshot(run_id), copy=False)

    def _step(self, packed: list, copies: list[tuple[int, int, int]]) -> None:
        with torch.inference_mode():
            self.sampler.execute(unpack_plan(packed), copies)  # the logits are rank 0's to sample from

    def sync_memory_plan(self) -> None:
        """At startup, on every rank at once: each measures its training memory plan together (the probe forward may run collectives), then
        all adopt one plan with the smallest budget, so every rank splits a batch into the same micro-batches."""
        if self.tp is None:
            return
        plan = self.trainer.memory_plan()
        budget = torch.tensor([plan.budget_bytes], dtype=torch.int64, device=self.trainer.model_device)
        self.tp.all_reduce_(budget, op=dist.ReduceOp.MIN)
        plan = self.tp.broadcast(dataclasses.replace(plan, budget_bytes=int(budget.item())))
        self.trainer._memory = plan  # noqa: SLF001 - Trainer's constructor seam for a fixed plan, set late
