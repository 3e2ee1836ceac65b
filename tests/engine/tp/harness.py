"""Run a function on T ranks of a real gloo tensor-parallel group (one spawned process per rank, CPU).

`run_ranks(fn, world, *args)` starts `world` processes, each joins the group (`init_tp` on a free loopback
port) and calls `fn(tp, *args)`; every rank's return value comes back (rank order). `fn` must be a module-level
function of an importable module (spawn pickles it by name); arguments and results travel by pickle."""

from __future__ import annotations

import os
import pickle
import queue
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    from tests.ports import free_port

    return free_port()


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out: Any) -> None:
    import torch.distributed as dist

    from tinkerbell.engine.tp.group import init_tp

    torch.set_num_threads(1)  # T processes share the CI machine's cores
    try:
        tp = init_tp(rank, world, f"tcp://127.0.0.1:{port}", torch.device("cpu"))
        try:
            # plain pickle (not torch's shared-memory one): the bytes outlive this process
            out.put((rank, "ok", pickle.dumps(fn(tp, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - carried to the parent, which raises it
        out.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    for _ in range(world):
        try:
            rank, status, value = out.get(timeout=timeout)
        except queue.Empty:
            errors.append(f"no answer from some rank within {timeout} s (exit codes "
                          f"{[p.exitcode for p in procs]})")
            break
        if status == "ok":
            results[rank] = pickle.loads(value)
        else:
            errors.append(f"rank {rank}:\n{value}")
            break  # the other ranks may hang in a collective: stop them below
    for p in procs:
        p.join(timeout=timeout if not errors else 1.0)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("a tensor-parallel rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
