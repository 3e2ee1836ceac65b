"""A tensor-parallel worker process (ranks 1..T-1): builds its shard of the engine, then executes rank 0's ops.

The worker builds the same `Engine` as rank 0 (model shard, trainer, sampler with its KV cache and LoRA slots)
but starts no loop thread and never plans: it waits in a broadcast for rank 0's next message and applies it
(executor.Mirror.serve). It exits 0 on rank 0's stop op, and 1 when rank 0 is gone (the broadcast fails on the
closed socket, or the parent pid changes) or when an op fails on this rank (rank 0's monitor then reports it).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tinkerbell.engine.engine import EngineConfig

log = logging.getLogger("tinkerbell.engine.tp")

PARENT_POLL_SECONDS = 1.0


def _exit_when_orphaned(parent_pid: int) -> None:
    """Rank 0 killed outright (SIGKILL) may leave the broadcast waiting on a socket for a while: poll."""

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != parent_pid:
                log.error("rank 0 (pid %d) is gone; worker pid %d exits", parent_pid, os.getpid())
                os._exit(1)

    threading.Thread(target=watch, name="tinkerbell-tp-parent", daemon=True).start()


def main(rank: int, world: int, init_method: str, config: "EngineConfig", parent_pid: int,
         plans: Connection) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s [tp rank {rank}]: %(message)s", force=True)
    # Ctrl+C (and a supervisor's SIGTERM to the process group) reach the worker too: it stops on rank 0's stop
    # op instead, or within a second of rank 0 being gone. Rank 0 SIGKILLs a worker that ignores the stop op.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_when_orphaned(parent_pid)
    import torch

    from tinkerbell.engine.engine import Engine
    from tinkerbell.engine.tp.executor import PlanChannel
    from tinkerbell.engine.tp.group import init_tp

    device = config.torch_device()
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    try:
        tp = init_tp(rank, world, init_method, device)
        engine = Engine(config, tp=tp, channel=PlanChannel(reader=plans))
    except Exception:  # noqa: BLE001 - rank 0's monitor reports the exit; the traceback goes to the log here
        log.exception("rank %d failed to start", rank)
        os._exit(1)
    try:
        engine.mirror.serve()
    except Exception as e:  # noqa: BLE001
        if isinstance(e, EOFError) or os.getppid() != parent_pid:
            log.error("rank 0 is gone (%s); exiting", e)
        else:
            log.exception("rank %d failed; exiting", rank)
        os._exit(1)
    log.info("rank %d stopped", rank)
    # No destroy_process_group: rank 0 may already be gone, and a teardown collective could wait for it.
    os._exit(0)
