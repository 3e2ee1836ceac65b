"""Starting, watching and stopping a replica's tensor-parallel worker processes (ranks 1..T-1).

Rank 0 is the API process. `Workers.start` spawns the other ranks (multiprocessing "spawn": a fresh
interpreter, no forked CUDA or thread state), each running worker.main, and a monitor thread that waits on their
sentinels: a worker that exits while the group is up is reported with its rank, pid and exit code and handed to
`on_death` (the engine fails every pending future and exits the process: a replica with a missing rank can only
hang). `stop` is the clean path: the engine has broadcast the stop op; workers get a grace period, then SIGKILL.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Callable

from tinkerbell.engine.tp.executor import PlanChannel

if TYPE_CHECKING:
    from tinkerbell.engine.engine import EngineConfig

log = logging.getLogger("tinkerbell.engine.tp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workers:
    def __init__(self, config: "EngineConfig", on_death: Callable[[str], None]):
        from tinkerbell.engine.tp.worker import main as worker_main

        self.world = config.tp
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        self.on_death = on_death
        self._stopping = threading.Event()
        self._reap = threading.Lock()  # the monitor and the engine thread may both ask: one waitpid at a time
        ctx = mp.get_context("spawn")
        self.procs: list[mp.process.BaseProcess] = []
        writers = []
        for rank in range(1, self.world):
            reader, writer = ctx.Pipe(duplex=False)  # rank 0's plans to this worker (executor.PlanChannel)
            # daemon: multiprocessing's exit handler terminates them if the API process exits without stop().
            p = ctx.Process(target=worker_main,
                            args=(rank, self.world, self.init_method, config, os.getpid(), reader),
                            name=f"tinkerbell-tp{rank}", daemon=True)
            p.start()
            reader.close()  # the worker holds the only reader; rank 0 holds the only writer
            log.info("tensor-parallel worker rank %d started (pid %d)", rank, p.pid)
            self.procs.append(p)
            writers.append(writer)
        self.channel = PlanChannel(writers=writers)
        self._monitor = threading.Thread(target=self._watch, name="tinkerbell-tp-monitor", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs, start=1)}
        while sentinels and not self._stopping.is_set():
            for s in wait(list(sentinels), timeout=0.5):
                rank = sentinels.pop(s)
                if self._stopping.is_set():
                    return
                msg = self._death(rank)
                log.error(msg)
                self.on_death(msg)
                return

    def _death(self, rank: int) -> str:
        p = self.procs[rank - 1]
        with self._reap:  # (two threads joining at once: the loser's waitpid fails and it sees no exit code)
            p.join(timeout=1)  # reap it, so its exit code is known
        return (f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}; "
                "the replica cannot run without it")

    def death_message(self, timeout: float) -> str | None:
        """Rank 0 saw a collective fail: if a worker died (or dies within `timeout`), the message naming it."""
        dead = wait([p.sentinel for p in self.procs], timeout=timeout)
        for rank, p in enumerate(self.procs, start=1):
            if p.sentinel in dead:
                return self._death(rank)
        return None

    def stop(self, timeout: float = 10.0) -> None:
        """After the stop op: wait for clean exits, then terminate (and kill) whatever is left."""
        self._stopping.set()
        for p in self.procs:
            p.join(timeout=timeout)
        for p in self.procs:
            if p.is_alive():  # it ignores SIGTERM (worker.py): it is stuck, not shutting down
                log.warning("tensor-parallel worker pid %d did not stop; killing it", p.pid)
                p.kill()
                p.join(timeout=5)
