"""Sampling sessions: which weights a sampler samples from, and `asample` onto the engine.

A sampler is the base model, a saved checkpoint (adapter key = its tinker:// path, registered with the engine
once per process, loaded into a slot lazily), or an ephemeral save (adapter key = the sampling session id,
published in memory by the trainer; its files are written in the background so a restart can reload them).
Samples are independent: (sampling_session_id, seq_id) is used only to deduplicate retries.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tinkerbell.engine.types import SampleJob, SampleResult
from tinkerbell.service.checkpoints import CheckpointManager
from tinkerbell.service.errors import BadRequest, NotFound, Overloaded
from tinkerbell.service.futures import FutureRegistry
from tinkerbell.service.runs import failure_category, failure_message
from tinkerbell.service.sessions import SessionManager
from tinkerbell.service.store import Store

if TYPE_CHECKING:
    from tinkerbell.engine.engine import Engine

log = logging.getLogger("tinkerbell.samplers")

# Ephemeral samplers of one training run kept as in-memory copies; older ones (an RL loop makes one per step)
# are demoted to their files on disk, so memory stays bounded while every sampler stays usable.
EPHEMERAL_IN_MEMORY_PER_RUN = 2


class SamplerManager:
    def __init__(self, store: Store, futures: FutureRegistry, sessions: SessionManager,
                 checkpoints: CheckpointManager, engine: "Engine", model_name: str,
                 encode_sample: Callable[[SampleResult], bytes]):
        self.store = store
        self.futures = futures
        self.sessions = sessions
        self.checkpoints = checkpoints
        self.engine = engine
        self.model_name = model_name
        self.encode_sample = encode_sample
        self._registered: set[str] = set()  # adapter keys the engine knows in this process
        self._in_memory: dict[str, list[tuple[str, Path]]] = {}  # run -> persisted ephemeral (key, folder), oldest first
        self._tasks: set[asyncio.Task] = set()
        self.samples_requested = 0
        self.tokens_sampled = 0
        self.in_flight = 0
        self.max_queued = 0  # --max-queued-requests; 0: no limit
        self.refused = 0
        self._engine_futures: dict[str, tuple[str, Future]] = {}  # request id -> (tenant, engine future)

    # ----------------------------------------------------------------------------------------- sessions

    def create(self, tenant: str, session_id: str, seq: int, base_model: str | None,
               model_path: str | None) -> str:
        self.sessions.require(tenant, session_id)
        sampler_id = f"{session_id}:sample:{seq}"
        existing = self.store.get_sampler(sampler_id)
        if existing is not None:
            if existing["tenant"] != tenant:
                raise NotFound(f"sampling session {sampler_id} belongs to another API key")
            return sampler_id  # a retried request
        if model_path:
            row, folder = self.checkpoints.resolve(tenant, model_path, "model_path",
                                                   kinds=("sampler_weights", "weights"))
            run = self.store.get_run(row["run"])
            base = run["base_model"] if run else self.model_name
            self.store.add_sampler(sampler_id, tenant, session_id, base, model_path, model_path, str(folder))
        elif base_model:
            if base_model != self.model_name:
                raise NotFound(f"base_model {base_model!r} is not served by this server; it serves "
                               f"{self.model_name!r}")
            self.store.add_sampler(sampler_id, tenant, session_id, base_model, None, None, None)
        else:
            raise BadRequest("create_sampling_session needs model_path (a tinker://... checkpoint path) or "
                             f"base_model ({self.model_name!r})")
        return sampler_id

    def add_ephemeral(self, tenant: str, session_id: str, sampler_id: str, model_id: str, staging: Path,
                      saved: Future) -> None:
        """Record an ephemeral sampler (its weights were just published under `sampler_id`) and keep the
        background write of its files: they become `adapter_dir` once complete."""
        final = self.checkpoints.root / model_id / "ephemeral" / sampler_id.rsplit(":", 1)[-1]
        self._registered.add(sampler_id)
        self.store.add_sampler(sampler_id, tenant, session_id, self.model_name, None, sampler_id, str(final))

        async def persist() -> None:
            try:
                await asyncio.wrap_future(saved)
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():
                    import shutil

                    shutil.rmtree(final, ignore_errors=True)
                staging.rename(final)
                self._demote_old_ephemerals(model_id, sampler_id, final)
            except BaseException as e:  # noqa: BLE001 - durability only; the in-memory sampler still works
                log.warning("could not persist the weights of sampler %s: %s", sampler_id, e)
                self.checkpoints.discard(staging)

        self._spawn(persist())

    def _demote_old_ephemerals(self, model_id: str, sampler_id: str, folder: Path) -> None:
        kept = self._in_memory.setdefault(model_id, [])
        kept.append((sampler_id, folder))
        while len(kept) > EPHEMERAL_IN_MEMORY_PER_RUN:
            key, old = kept.pop(0)
            # Re-registering the key with its folder replaces the in-memory copy; it reloads from disk on use.
            self.engine.register_checkpoint(key, old)
            log.info("sampler %s: in-memory weights released; it reloads from %s when used", key, old)

    def invalidate(self, adapter_key: str) -> None:
        """The weights behind `adapter_key` changed (overwrite) or never arrived: register again on next use."""
        self._registered.discard(adapter_key)

    def get(self, tenant: str, sampler_id: str) -> dict[str, Any]:
        row = self.store.get_sampler(sampler_id)
        if row is None or row["tenant"] != tenant:
            raise NotFound(f"sampler_id {sampler_id!r} is not a sampling session of this API key")
        return row

    def describe(self, tenant: str, sampler_id: str) -> dict[str, Any]:
        row = self.get(tenant, sampler_id)
        return {"sampler_id": sampler_id, "base_model": row["base_model"], "model_path": row["model_path"]}

    # ----------------------------------------------------------------------------------------- sampling

    def _adapter_for(self, row: dict[str, Any]) -> str | None:
        key = row["adapter_key"]
        if key is None or key in self._registered:
            return key
        folder = Path(row["adapter_dir"]) if row["adapter_dir"] else None
        if folder is None or not folder.is_dir():
            raise NotFound(f"the weights of sampling session {row['sampler_id']} are no longer on this server "
                           "(the server restarted before they were saved, or the checkpoint was deleted); "
                           "create a new sampling client")
        # The engine queue is FIFO, so this registration precedes the sample submitted right after it.
        self.engine.register_checkpoint(key, folder)
        self._registered.add(key)
        return key

    def resolve_adapter(self, tenant: str, req: dict[str, Any]) -> tuple[str, str | None]:
        """(dedupe scope, adapter key) for an asample body: by sampling_session_id, else model_path/base_model."""
        sid = req.get("sampling_session_id")
        if sid:
            return sid, self._adapter_for(self.get(tenant, sid))
        if req.get("model_path"):
            row, folder = self.checkpoints.resolve(tenant, req["model_path"], "model_path",
                                                   kinds=("sampler_weights", "weights"))
            key = row["tinker_path"]
            if key not in self._registered:
                self.engine.register_checkpoint(key, folder)
                self._registered.add(key)
            return key, key
        if req.get("base_model"):
            if req["base_model"] != self.model_name:
                raise NotFound(f"base_model {req['base_model']!r} is not served by this server; it serves "
                               f"{self.model_name!r}")
            return "base", None
        raise BadRequest("asample needs sampling_session_id (or model_path / base_model)")

    def sample(self, tenant: str, req: dict[str, Any], make_job: Callable[[dict[str, Any]], SampleJob]) -> dict:
        """Submit one asample; returns the handle (request_id + sample_sequence_ids)."""
        scope, adapter_key = self.resolve_adapter(tenant, req)
        seq_id = req.get("seq_id")
        dedupe = f"sample|{scope}|{seq_id}" if seq_id is not None else None
        if dedupe is not None and (rid := self.futures.find(tenant, dedupe)) is not None:
            n = self._num_samples(req)
            return {"request_id": rid, "sample_sequence_ids": [f"{rid}-{i}" for i in range(n)]}
        job = make_job(req)  # raises the codec's WireError (a 400) before anything is recorded
        job.adapter_key = adapter_key
        self.admit()  # after validation: a request that can never succeed gets its 4xx, not a 429 to retry
        rid, _, _ = self.futures.create(tenant, "sample", dedupe_key=dedupe)
        self.samples_requested += job.num_samples
        self.in_flight += 1
        fut = self.engine.sample(job)
        self._engine_futures[rid] = (tenant, fut)
        self._spawn(self._finish(rid, fut, adapter_key))
        return {"request_id": rid, "sample_sequence_ids": [f"{rid}-{i}" for i in range(job.num_samples)]}

    def admit(self) -> None:
        """Refuse new sampling work (429 + Retry-After) while --max-queued-requests are unfinished. Every face
        that submits samples calls this first, so the queue, and the memory it holds, stays bounded."""
        if self.max_queued and self.in_flight >= self.max_queued:
            self.refused += 1
            raise Overloaded(f"the server already holds {self.in_flight} unfinished sampling requests "
                             f"(--max-queued-requests {self.max_queued}); retry after a moment")

    def cancel(self, tenant: str, request_id: str) -> bool:
        """Cancel an unfinished sample: the engine frees its KV blocks and slot at its next step, and the future
        is failed with a reason. False when the request is unknown to this tenant or already finished."""
        entry = self._engine_futures.get(request_id)
        if entry is None or entry[0] != tenant:
            return False
        return entry[1].cancel()

    @staticmethod
    def _num_samples(req: dict[str, Any]) -> int:
        n = req.get("num_samples", 1)
        return n if isinstance(n, int) and n > 0 else 1

    async def _finish(self, rid: str, fut: Future, adapter_key: str | None) -> None:
        try:
            result: SampleResult = await asyncio.wrap_future(fut)
            self.tokens_sampled += sum(len(s.tokens) for s in result.sequences)
            self.futures.complete_proto(rid, self.encode_sample(result))
        except asyncio.CancelledError:
            # The engine future was cancelled (cancel_future, or the server shutting down): say so, never hang.
            self.futures.fail(rid, "the request was cancelled before it finished", "user")
        except BaseException as e:  # noqa: BLE001 - every failure goes to the request's future
            category = failure_category(e)
            if category == "server":
                log.error("sample %s failed", rid, exc_info=e)
            elif adapter_key is not None and "adapter" in str(e).lower():
                self.invalidate(adapter_key)  # e.g. unreadable files: let the next request try again
            self.futures.fail(rid, failure_message(e), category)  # type: ignore[arg-type]
        finally:
            self.in_flight -= 1
            self._engine_futures.pop(rid, None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
