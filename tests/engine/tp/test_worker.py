"""Rank 0's engine with a real worker process (gloo, CPU): what the op mirror keeps in step, and what a worker's
death does to pending requests. The SDK-level equivalence tests are tests/e2e/test_tp.py."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from tinkerbell.engine.lora import AdapterWeights, LoraSpec
from tinkerbell.engine.lora_slots import LoraSlots
from tinkerbell.engine.models.loader import read_config
from tinkerbell.engine.types import AdamParams, EngineUserError, SampleJob, TrainDatum


@pytest.fixture
def engine_tp2(tiny_llama_dir: Path):
    import torch.distributed as dist

    from tinkerbell.engine.engine import Engine, EngineConfig

    fatal: list[str] = []
    engine = Engine(EngineConfig(model=str(tiny_llama_dir), tp=2))
    engine.on_fatal = fatal.append  # the server exits here; a test process must not
    engine.fatal = fatal
    try:
        yield engine
    finally:
        engine._stop.set()
        engine._thread.join(timeout=10)
        engine.workers.stop(timeout=10)
        if dist.is_initialized():
            dist.destroy_process_group()


def _datum() -> TrainDatum:
    ids = np.arange(5, 30, dtype=np.int64)
    return TrainDatum(tokens=ids[:-1], inputs={"target_tokens": ids[1:], "weights": np.ones(24, np.float32)})


def test_a_refused_op_leaves_the_ranks_in_step(engine_tp2):
    engine_tp2.create_adapter("r", LoraSpec(rank=4), seed=0).result()
    with pytest.raises(EngineUserError, match="already exists"):  # refused on every rank alike
        engine_tp2.create_adapter("r", LoraSpec(rank=4), seed=0).result()
    first = engine_tp2.forward_backward("r", [_datum()], "cross_entropy", {}, False).result().metrics["loss:sum"]
    engine_tp2.optim_step("r", AdamParams(learning_rate=1e-2)).result()
    second = engine_tp2.forward_backward("r", [_datum()], "cross_entropy", {}, False).result().metrics["loss:sum"]
    assert second < first  # both ranks trained the same adapter: the collectives still line up
    assert not engine_tp2.fatal


def test_a_dead_worker_fails_pending_requests_naming_its_rank(engine_tp2):
    worker = engine_tp2.workers.procs[0]
    fut = engine_tp2.sample(SampleJob(prompt=[5, 6, 7], max_tokens=1500, temperature=0.0, stop_at_eos=False))
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=re.escape(f"rank 1 (pid {worker.pid}) exited with code -9")):
        fut.result(timeout=60)
    assert engine_tp2.fatal and "rank 1" in engine_tp2.fatal[0]


def test_a_worker_repeats_rank_0s_slot_loads(tiny_llama_dir: Path):
    """LoraSlots' log of rank 0's loads, replayed on a follower, gives the follower the same slot contents,
    and the follower keeps a slot's weights after its key is unregistered (rank 0 may still run them)."""
    cfg = read_config(tiny_llama_dir)
    leader = LoraSlots(cfg, max_loras=2, max_lora_rank=8, dtype=torch.float32, device="cpu")
    follower = LoraSlots(cfg, max_loras=2, max_lora_rank=8, dtype=torch.float32, device="cpu")
    leader.load_log = []
    adapters = {k: AdapterWeights.init(cfg, LoraSpec(rank=4), seed=i, dtype=torch.float32, device="cpu")
                for i, k in enumerate("abc")}
    for k, w in adapters.items():  # every rank registers (mirrored op); only rank 0 acquires
        for s in (leader, follower):
            s.register(k, w)
    for k in adapters:
        leader.acquire(k)
        if k == "b":
            leader.release(0)  # a's slot is free again: c evicts it
    assert leader.load_log == [(0, "a"), (1, "b"), (0, "c")]
    for slot, key in leader.load_log:
        follower.load_as(slot, key)
    for slot in range(2):
        for key in leader.a:
            torch.testing.assert_close(follower.a[key][slot], leader.a[key][slot], rtol=0, atol=0)
            torch.testing.assert_close(follower.b[key][slot], leader.b[key][slot], rtol=0, atol=0)
    follower.unregister("c")
    assert follower.weights(0).spec.rank == 4  # still there for rank 0's running requests


def test_a_step_plan_survives_the_channel():
    """What a worker executes is exactly rank 0's plan: packed, pickled through a real pipe, unpacked."""
    import multiprocessing as mp

    from tinkerbell.engine.batch import SeqSpan
    from tinkerbell.engine.runner import StepPlan
    from tinkerbell.engine.tp.executor import PlanChannel, pack_plan, unpack_plan

    plan = StepPlan(ids=[5, 6, 7, 9], slots=[32, 33, 34, 80], token_lora=[-1, -1, -1, 1], gathered=[2, 3],
                    gathered_lora=[-1, 1], spans=[SeqSpan(start=0, length=3, context_len=3, block_table=[2]),
                                                  SeqSpan(start=3, length=1, context_len=17, block_table=[4, 5])])
    reader, writer = mp.Pipe(duplex=False)
    PlanChannel(writers=[writer]).send(([(1, "k")], ("step", (pack_plan(plan), [(2, 7, 16)]))))
    loads, (name, (packed, copies)) = PlanChannel(reader=reader).recv()
    assert (loads, name, copies) == ([(1, "k")], "step", [(2, 7, 16)])
    assert unpack_plan(packed) == plan
    writer.close()
    with pytest.raises(EOFError):  # how a worker learns that rank 0 is gone
        PlanChannel(reader=reader).recv()
