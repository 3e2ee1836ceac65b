"""Training runs: creation, the per-model seq_id reorder buffer, and every numbered training request.

Ordering (tinker_api.md section 6): submit handlers never block. Each request becomes an `_Op` parked in its
model's buffer under its seq_id; when seq_id == next_seq it is *started*: its synchronous part validates and
hands the work to the engine (whose queue is FIFO, so engine order = seq order) and returns an awaitable that
finishes the future. The next op starts at once, without waiting for the previous one to finish, so
`forward_backward` + `optim_step` pipeline the way the SDK intends. A gap waits; a failed op does not stop the
model; a rejected submission is parked as a failing op so its seq_id is consumed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Union

from tinkerbell.engine.lora import LoraSpec
from tinkerbell.engine.types import AdamParams, EngineCapacityError, ForwardBackwardResult, TrainDatum
from tinkerbell.service.checkpoints import (
    CheckpointManager,
    tinker_path,
    validate_name,
    validate_ttl,
)
from tinkerbell.service.errors import BadRequest, NotFound, ServerFault, ServiceError
from tinkerbell.service.futures import FutureRegistry
from tinkerbell.service.sessions import SessionManager
from tinkerbell.service.store import Store, iso

if TYPE_CHECKING:
    from tinkerbell.engine.engine import Engine
    from tinkerbell.service.samplers import SamplerManager

log = logging.getLogger("tinkerbell.runs")

Result = Union[dict[str, Any], bytes]  # JSON object, or protobuf bytes
Start = Callable[[], Awaitable[Result]]
MAX_AGE_RECIPIENTS = 10
# How far past the next expected seq_id a request may be parked. The SDK keeps at most its chunks of one
# forward_backward in flight; a seq_id far ahead is a client bug (or abuse) that would pin memory forever.
MAX_SEQ_AHEAD = 4096
MAX_SEED = 2**63 - 1  # seeds are stored as SQLite INTEGERs


@dataclass
class _Op:
    request_id: str
    kind: str
    start: Start | None  # None: a rejected submission whose seq_id must still be consumed
    error: str | None = None


@dataclass
class _ModelQueue:
    next_seq: int
    waiting: dict[int, _Op] = field(default_factory=dict)


def failure_category(e: BaseException) -> str:
    """User errors are ours (ServiceError) and the engine's/codec's (ValueError subclasses)."""
    return "user" if isinstance(e, (ServiceError, ValueError)) else "server"


def failure_message(e: BaseException) -> str:
    if isinstance(e, (ServiceError, ServerFault)):
        return e.detail
    if failure_category(e) == "user" or isinstance(e, EngineCapacityError):
        return str(e)
    return f"internal error ({type(e).__name__}); see the server log"


def stringify(meta: dict[str, Any] | None) -> dict[str, str] | None:
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else None


class RunManager:
    def __init__(self, store: Store, futures: FutureRegistry, sessions: SessionManager,
                 checkpoints: CheckpointManager, engine: "Engine", model_name: str, max_lora_rank: int,
                 encode_forward_backward: Callable[[ForwardBackwardResult], bytes]):
        self.store = store
        self.futures = futures
        self.sessions = sessions
        self.checkpoints = checkpoints
        self.engine = engine
        self.model_name = model_name
        self.max_lora_rank = max_lora_rank
        self.encode_forward_backward = encode_forward_backward
        self.samplers: "SamplerManager | None" = None  # set by the app (samplers need runs, runs need samplers)
        self._queues: dict[str, _ModelQueue] = {}
        self._live: set[str] = set()  # runs whose adapter exists in this process' engine
        self._dead: dict[str, str] = {}  # runs whose creation failed in this process -> why
        self._tasks: set[asyncio.Task] = set()
        self.tokens_trained = 0

    # ----------------------------------------------------------------------------------------- lookup

    def require(self, tenant: str, model_id: str) -> dict[str, Any]:
        row = self.store.get_run(model_id)
        if row is None or row["tenant"] != tenant:
            raise NotFound(f"model_id {model_id!r} is not a training run of this API key (create one with "
                           "create_lora_training_client)")
        return row

    def check_base_model(self, base_model: str | None, field: str = "base_model") -> str:
        if base_model is None:
            return self.model_name
        if base_model != self.model_name:
            raise NotFound(f"{field} {base_model!r} is not served by this server; it serves {self.model_name!r} "
                           "(see GET /api/v1/get_server_capabilities)")
        return base_model

    def queue_depth(self) -> int:
        return sum(len(q.waiting) for q in self._queues.values())

    # ----------------------------------------------------------------------------------------- ordering

    def _queue(self, model_id: str) -> _ModelQueue:
        q = self._queues.get(model_id)
        if q is None:
            row = self.store.get_run(model_id)
            q = self._queues[model_id] = _ModelQueue(next_seq=row["next_seq"] if row else 1)
        return q

    def accept(self, tenant: str, model_id: str, seq_id: int | None, kind: str) -> tuple[str, bool]:
        """Check ownership and allocate (or, for a repeated (model_id, seq_id), find) the request id."""
        self.require(tenant, model_id)
        next_seq = self._queue(model_id).next_seq
        if seq_id is not None and seq_id > next_seq + MAX_SEQ_AHEAD:
            raise BadRequest(f"seq_id {seq_id} is more than {MAX_SEQ_AHEAD} ahead of the next expected request "
                             f"({next_seq}) of model {model_id}; requests of a model are numbered 1, 2, 3, ...")
        if seq_id is None:
            # Only pre-ordering clients omit seq_id: such a request goes after everything already submitted.
            rid, _, _ = self.futures.create(tenant, kind)
            return rid, True
        rid, created, _ = self.futures.create(tenant, kind, dedupe_key=f"train|{model_id}|{seq_id}")
        return rid, created

    def enqueue(self, model_id: str, seq_id: int | None, request_id: str, kind: str, start: Start | None,
                error: str | None = None) -> None:
        q = self._queue(model_id)
        if seq_id is None:
            seq_id = max([q.next_seq - 1, *q.waiting]) + 1
        if seq_id < q.next_seq or seq_id in q.waiting:
            self.futures.fail(request_id, f"seq_id {seq_id} of model {model_id} was already used (requests of a "
                              f"model are numbered 1, 2, 3, ...; the next expected is {q.next_seq})", "user")
            return
        q.waiting[seq_id] = _Op(request_id, kind, start, error)
        self._pump(model_id, q)

    def _pump(self, model_id: str, q: _ModelQueue) -> None:
        started = False
        while q.next_seq in q.waiting:
            op = q.waiting.pop(q.next_seq)
            q.next_seq += 1
            started = True
            self._start(op)
        if started:
            self.store.touch_run(model_id, q.next_seq)

    def _start(self, op: _Op) -> None:
        if op.start is None:
            self.futures.fail(op.request_id, op.error or "request rejected", "user")
            return
        try:
            awaitable = op.start()
        except BaseException as e:  # noqa: BLE001 - every failure goes to the request's future
            self._fail(op, e)
            return
        task = asyncio.get_running_loop().create_task(self._finish(op, awaitable))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, op: _Op, awaitable: Awaitable[Result]) -> None:
        try:
            result = await awaitable
        except BaseException as e:  # noqa: BLE001
            self._fail(op, e)
            return
        if isinstance(result, bytes):
            self.futures.complete_proto(op.request_id, result)
        else:
            self.futures.complete_json(op.request_id, result)

    def _fail(self, op: _Op, e: BaseException) -> None:
        category = failure_category(e)
        if category == "server":
            log.error("%s %s failed", op.kind, op.request_id, exc_info=e)
        self.futures.fail(op.request_id, failure_message(e), category)  # type: ignore[arg-type]

    def _check_live(self, model_id: str) -> None:
        if model_id in self._dead:
            raise BadRequest(f"training run {model_id} could not be created ({self._dead[model_id]}); create a new "
                             "training client")
        if model_id not in self._live:
            raise BadRequest(f"training run {model_id} is not loaded in this server (the server restarted since "
                             "it was created); continue from your last save_state checkpoint with "
                             "create_training_client_from_state_with_optimizer(<tinker://.../weights/...>)")

    # ----------------------------------------------------------------------------------------- creation

    def create_model(self, tenant: str, session_id: str, model_seq_id: int, base_model: str,
                     spec: LoraSpec, seed: int | None, optimizer: dict[str, Any],
                     user_metadata: dict[str, Any] | None) -> tuple[str, str]:
        """(request_id, model_id): the adapter is created as the model's request 0."""
        self.sessions.require(tenant, session_id)
        self.check_base_model(base_model)
        if not 1 <= spec.rank <= self.max_lora_rank:
            raise BadRequest(f"lora_config.rank must be between 1 and {self.max_lora_rank} (this server's "
                             f"--max-lora-rank); got {spec.rank}")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise BadRequest(f"lora_config.seed must be between 0 and {MAX_SEED}; got {seed}")
        if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
            raise BadRequest("lora_config: at least one of train_attn, train_mlp, train_unembed must be true")
        self._check_optimizer(optimizer, "optimizer_config")
        model_id = f"{session_id}:train:{model_seq_id}"
        if (rid := self.futures.find(tenant, f"create|{model_id}")) is not None:
            return rid, model_id  # a retried submission
        self._ensure_new(model_id)
        rid, _, _ = self.futures.create(tenant, "create_model", dedupe_key=f"create|{model_id}")
        self.store.add_run(model_id, tenant, session_id, base_model, spec.rank, spec.train_attn, spec.train_mlp,
                           spec.train_unembed, seed, optimizer, user_metadata)
        self._queues[model_id] = _ModelQueue(next_seq=0)

        def start() -> Awaitable[Result]:
            fut = self.engine.create_adapter(model_id, spec, seed)
            self._live.add(model_id)
            return self._await(fut, lambda _: {"model_id": model_id}, on_error=self._creation_failed(model_id, fut))

        self.enqueue(model_id, 0, rid, "create_model", start)
        return rid, model_id

    def _ensure_new(self, model_id: str) -> None:
        if self.store.get_run(model_id) is not None:
            raise BadRequest(f"model_id {model_id} already exists: model_seq_id must be new within the session")

    @staticmethod
    def _check_optimizer(optimizer: dict[str, Any] | None, field: str) -> None:
        kind = (optimizer or {}).get("type", "adamw")
        if kind != "adamw":
            raise BadRequest(f"{field}.type {kind!r} is not supported by this server; use {{'type': 'adamw'}} "
                             "(the default)")

    def create_from_checkpoint(self, tenant: str, session_id: str, model_seq_id: int, path: str,
                               with_optimizer: bool, base_model: str | None, optimizer: dict[str, Any] | None,
                               user_metadata: dict[str, Any] | None) -> tuple[str, str]:
        """Create-via-load: model `{session_id}:train:{model_seq_id}` starts from a `weights` checkpoint."""
        self.sessions.require(tenant, session_id)
        self.check_base_model(base_model)
        self._check_optimizer(optimizer, "optimizer_config")
        model_id = f"{session_id}:train:{model_seq_id}"
        if (rid := self.futures.find(tenant, f"create|{model_id}")) is not None:
            return rid, model_id  # a retried submission
        src_row, folder = self.checkpoints.resolve(tenant, path, "path", kinds=("weights", "sampler_weights"))
        if with_optimizer and src_row["kind"] != "weights":
            raise BadRequest(f"path {path} is a sampler checkpoint without optimizer state; load a "
                             "tinker://.../weights/... path, or load with optimizer=false")
        spec = self._spec_of(folder, path)
        self._ensure_new(model_id)
        rid, _, _ = self.futures.create(tenant, "load_weights", dedupe_key=f"create|{model_id}")
        src_run = self.store.get_run(src_row["run"])
        meta = user_metadata if user_metadata is not None else (src_run or {}).get("user_metadata")
        self.store.add_run(model_id, tenant, session_id, self.model_name, spec.rank, spec.train_attn, spec.train_mlp,
                           spec.train_unembed, None, optimizer or {"type": "adamw"}, meta)
        self._queues[model_id] = _ModelQueue(next_seq=0)

        def start() -> Awaitable[Result]:
            fut = self.engine.load_adapter(model_id, folder, with_optimizer)
            self._live.add(model_id)
            return self._await(fut, lambda _: {"model_id": model_id, "path": path},
                               on_error=self._creation_failed(model_id, fut))

        self.enqueue(model_id, 0, rid, "load_weights", start)
        return rid, model_id

    @staticmethod
    def _spec_of(folder: Path, path: str) -> LoraSpec:
        from tinkerbell.engine.adapter_io import read_spec

        try:
            return read_spec(folder)
        except (OSError, ValueError, KeyError):
            raise BadRequest(f"path {path}: the checkpoint's adapter_config.json is missing or unreadable") from None

    def _await(self, fut: Future, make: Callable[[Any], Result],
               on_error: Callable[[], None] | None = None) -> Awaitable[Result]:
        async def finish() -> Result:
            try:
                value = await asyncio.wrap_future(fut)
            except BaseException:
                if on_error:
                    on_error()
                raise
            return make(value)

        return finish()

    def _creation_failed(self, model_id: str, fut: Future) -> Callable[[], None]:
        def note() -> None:
            self._live.discard(model_id)
            exc = fut.exception() if fut.done() else None
            self._dead[model_id] = failure_message(exc) if exc is not None else "see the server log"

        return note

    # ----------------------------------------------------------------------------------------- numbered ops

    def submit(self, tenant: str, model_id: str, seq_id: int | None, kind: str,
               build: Callable[[], Start]) -> str:
        """Accept a numbered request: `build` validates the body (raising to reject it, which still consumes
        the seq_id) and returns the op's start function."""
        rid, created = self.accept(tenant, model_id, seq_id, kind)
        if not created:
            return rid
        if (seq_id is not None and model_id not in self._live and model_id not in self._dead
                and seq_id > self._queue(model_id).next_seq):
            # The run is held by no engine of this process (its replica restarted): the requests before this one
            # went to the process that died, so waiting for them would never end. Fail now, saying how to resume.
            try:
                self._check_live(model_id)
            except BadRequest as e:
                self.futures.fail(rid, failure_message(e), "user")
                return rid
        try:
            start = build()
        except BaseException as e:  # noqa: BLE001
            if failure_category(e) == "server":
                log.error("%s %s rejected", kind, rid, exc_info=e)
            self.enqueue(model_id, seq_id, rid, kind, None, failure_message(e))
            return rid
        self.enqueue(model_id, seq_id, rid, kind, start)
        return rid

    def reject(self, tenant: str, model_id: str, seq_id: int | None, kind: str, message: str) -> str:
        """A submission whose body could not be used: consume its seq_id with a failed future."""
        rid, created = self.accept(tenant, model_id, seq_id, kind)
        if created:
            self.enqueue(model_id, seq_id, rid, kind, None, message)
        return rid

    def forward_backward_op(self, model_id: str, seq_id: int, data: list[TrainDatum], loss_fn: str,
                            loss_config: dict[str, Any], forward_only: bool) -> Start:
        def start() -> Awaitable[Result]:
            self._check_live(model_id)
            fut = self.engine.forward_backward(model_id, data, loss_fn, loss_config, forward_only)

            def done(result: ForwardBackwardResult) -> bytes:
                self.store.add_metrics(model_id, seq_id, "forward" if forward_only else "forward_backward",
                                       {k: float(v) for k, v in result.metrics.items()})
                if not forward_only:
                    self.tokens_trained += sum(int(d.tokens.shape[0]) for d in data)
                return self.encode_forward_backward(result)

            return self._await(fut, done)

        return start

    def optim_step_op(self, model_id: str, seq_id: int | None, params: AdamParams) -> Start:
        def start() -> Awaitable[Result]:
            self._check_live(model_id)
            fut = self.engine.optim_step(model_id, params)

            def done(metrics: dict[str, float] | None) -> Result:
                metrics = {k: float(v) for k, v in (metrics or {}).items()}
                if seq_id is not None:
                    self.store.add_metrics(model_id, seq_id, "optim_step",
                                           {**metrics, "learning_rate": params.learning_rate})
                return {"metrics": metrics}

            return self._await(fut, done)

        return start

    def load_weights_op(self, tenant: str, model_id: str, path: str, with_optimizer: bool) -> Start:
        """Legacy load_state on an existing model: replace its adapter (and optimizer state) in order."""
        _row, folder = self.checkpoints.resolve(tenant, path, "path", kinds=("weights", "sampler_weights"))
        spec = self._spec_of(folder, path)

        def start() -> Awaitable[Result]:
            self._check_live(model_id)
            self.engine.drop_adapter(model_id)
            fut = self.engine.load_adapter(model_id, folder, with_optimizer)

            def done(_: Any) -> Result:
                self.store.update_run_spec(model_id, spec.rank, spec.train_attn, spec.train_mlp, spec.train_unembed)
                return {"model_id": model_id, "path": path}

            return self._await(fut, done, on_error=self._creation_failed(model_id, fut))

        return start

    def save_op(self, tenant: str, model_id: str, kind: str, name: str | None, overwrite: bool,
                ttl_seconds: int | None, user_metadata: dict[str, Any] | None,
                recipients: list[str] | None = None) -> Start:
        """save_weights (kind weights, with optimizer state), named save_weights_for_sampler (sampler_weights)
        and save_weights_external (external_weights, optionally age-encrypted)."""
        name = validate_name(name, "path")
        expires_at = validate_ttl(ttl_seconds)
        age = parse_recipients(recipients) if recipients else None

        def start() -> Awaitable[Result]:
            self._check_live(model_id)
            if not overwrite and self.checkpoints.exists(model_id, kind, name):
                raise BadRequest(f"checkpoint {tinker_path(model_id, kind, name)} already exists; pick another "
                                 "name (path), delete it first, or save with overwrite=true")
            target = tinker_path(model_id, kind, name)
            try:
                staging = self.checkpoints.new_staging_dir()
            except OSError as e:
                raise save_fault(target, e) from e
            fut = self.engine.save_adapter(model_id, staging, kind == "weights")

            async def finish() -> Result:
                try:
                    await asyncio.wrap_future(fut)
                    if age is not None:
                        await asyncio.to_thread(encrypt_folder, staging, age)
                    row = self.checkpoints.commit(staging, model_id, kind, name, tenant, expires_at, user_metadata)
                except BaseException as e:
                    self.checkpoints.discard(staging)
                    if failure_category(e) == "server" and not isinstance(e, (ServerFault, asyncio.CancelledError)):
                        raise save_fault(target, e) from e
                    raise
                if self.samplers is not None:
                    self.samplers.invalidate(row["tinker_path"])  # an overwrite must not leave stale weights
                out: dict[str, Any] = {"path": row["tinker_path"]}
                if kind == "external_weights":
                    out["size_bytes"] = row["size_bytes"]
                return out

            return finish()

        return start

    def ephemeral_sampler_op(self, tenant: str, model_id: str, sampling_session_seq_id: int) -> Start:
        """save_weights_and_get_sampling_client: a sampling session bound to the weights at this point in order.
        The sampler gets an in-memory copy; a background disk write lets a restart (or an evicted slot) reload."""
        assert self.samplers is not None
        samplers = self.samplers
        run = self.require(tenant, model_id)
        sampler_id = f"{run['session_id']}:sample:{sampling_session_seq_id}"

        def start() -> Awaitable[Result]:
            self._check_live(model_id)
            published = self.engine.publish_to_sampler(model_id, sampler_id)
            staging = self.checkpoints.new_staging_dir()
            saved = self.engine.save_adapter(model_id, staging, False)  # right behind: the same weights
            samplers.add_ephemeral(tenant, run["session_id"], sampler_id, model_id, staging, saved)
            return self._await(published, lambda _: {"sampling_session_id": sampler_id},
                               on_error=lambda: samplers.invalidate(sampler_id))

        return start

    # ----------------------------------------------------------------------------------------- info / REST

    def get_info(self, tenant: str, model_id: str, arch: str) -> dict[str, Any]:
        row = self.require(tenant, model_id)
        return {
            "type": "get_info",
            "model_id": model_id,
            "model_data": {"arch": arch, "model_name": row["base_model"], "tokenizer_id": row["base_model"]},
            "is_lora": True,
            "lora_rank": row["lora_rank"],
            "model_name": row["base_model"],
            "optimizer_config": row["optimizer"],
        }

    def training_run(self, tenant: str, model_id: str) -> dict[str, Any]:
        return self._run_wire(self.require(tenant, model_id))

    def _run_wire(self, row: dict[str, Any]) -> dict[str, Any]:
        return {
            "training_run_id": row["model_id"],
            "base_model": row["base_model"],
            "model_owner": row["tenant"],
            "is_lora": True,
            "corrupted": False,
            "lora_rank": row["lora_rank"],
            "last_request_time": iso(row["last_request_time"]),
            "last_checkpoint": self.checkpoints.last_of_kind(row["model_id"], "weights"),
            "last_sampler_checkpoint": self.checkpoints.last_of_kind(row["model_id"], "sampler_weights"),
            "user_metadata": stringify(row["user_metadata"]),
        }

    def list_runs(self, tenant: str, limit: int, offset: int) -> dict[str, Any]:
        rows, total = self.store.list_runs(tenant, limit, offset)
        return {"training_runs": [self._run_wire(r) for r in rows],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    def weights_info(self, tenant: str, path: str) -> dict[str, Any]:
        row, folder = self.checkpoints.resolve(tenant, path, "tinker_path")
        spec = self._spec_of(folder, path) if (folder / "adapter_config.json").exists() else None
        run = self.store.get_run(row["run"]) or {}
        out: dict[str, Any] = {"base_model": run.get("base_model", self.model_name), "is_lora": True,
                               "optimizer_config": run.get("optimizer") or {"type": "adamw"}}
        if spec is not None:
            out.update(lora_rank=spec.rank, train_unembed=spec.train_unembed, train_mlp=spec.train_mlp,
                       train_attn=spec.train_attn)
        elif run:
            out.update(lora_rank=run["lora_rank"], train_unembed=run["train_unembed"], train_mlp=run["train_mlp"],
                       train_attn=run["train_attn"])
        return out

    def copy_weights(self, tenant: str, source_path: str, session_id: str | None, model_seq_id: int | None,
                     ttl_seconds: int | None) -> dict[str, Any]:
        """Copy a checkpoint into a new, untrainable run (tinker's copy_weights)."""
        row, _folder = self.checkpoints.resolve(tenant, source_path, "source_path")
        expires_at = validate_ttl(ttl_seconds)
        if session_id is not None:
            self.sessions.require(tenant, session_id)
            dest = f"{session_id}:train:{model_seq_id or 0}"
        else:
            session_id = str(uuid.uuid4())
            dest = f"{session_id}:train:0"
        existing = self.store.get_run(dest)
        if existing is not None and existing["tenant"] != tenant:
            raise NotFound(f"model {dest} belongs to another API key")
        src = self.store.get_run(row["run"]) or {}
        if existing is None:
            self.store.add_run(dest, tenant, session_id, src.get("base_model", self.model_name),
                               src.get("lora_rank", 0), src.get("train_attn", True), src.get("train_mlp", True),
                               src.get("train_unembed", True), None, src.get("optimizer") or {"type": "adamw"},
                               src.get("user_metadata"), trainable=False)
        copied = self.checkpoints.copy(row, dest, tenant, expires_at)
        return {"tinker_path": copied["tinker_path"]}


def save_fault(target: str, e: BaseException) -> ServerFault:
    """A save that failed on the server's side (disk full, unwritable data dir, a writer error), said plainly:
    the half-written files were discarded and an existing checkpoint of that name was not touched."""
    log.error("saving %s failed", target, exc_info=e)
    if isinstance(e, OSError):
        why = e.strerror or str(e) or type(e).__name__
    else:
        why = f"{type(e).__name__}: {e}"
    return ServerFault(f"could not write checkpoint {target}: {why}. The server's data dir may be full or "
                       "read-only; nothing was saved and any previous checkpoint of that name is kept")


# --------------------------------------------------------------------------------------------- age encryption


def parse_recipients(recipients: list[str]) -> list[Any]:
    import pyrage

    if len(recipients) > MAX_AGE_RECIPIENTS:
        raise BadRequest(f"age_encryption_recipients has {len(recipients)} entries; at most {MAX_AGE_RECIPIENTS}")
    out = []
    for i, r in enumerate(recipients):
        try:
            if r.startswith("age1"):
                out.append(pyrage.x25519.Recipient.from_str(r))
            elif r.startswith(("ssh-", "ecdsa-")):
                out.append(pyrage.ssh.Recipient.from_str(r))
            else:
                raise ValueError("unknown recipient type")
        except Exception:  # noqa: BLE001 - pyrage raises its own error types
            raise BadRequest(f"age_encryption_recipients[{i}] is not an age recipient ('age1...') or an SSH public "
                             f"key ('ssh-ed25519 ...' / 'ssh-rsa ...'): {r[:24]!r}") from None
    return out


def encrypt_folder(folder: Path, recipients: list[Any]) -> None:
    """Replace every file with its age encryption `<name>.age`."""
    import pyrage

    for f in [p for p in folder.rglob("*") if p.is_file()]:
        enc = f.with_name(f.name + ".age")
        enc.write_bytes(pyrage.encrypt(f.read_bytes(), recipients))
        f.unlink()
