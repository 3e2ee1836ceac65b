"""Futures: the request ids every async endpoint hands out and `retrieve_future` long-polls on.

Results are stored pre-serialised (protobuf bytes for forward_backward and sample, JSON for the rest) in SQLite
the moment they are known, so a restart loses no finished future; a future still pending when the process
died is failed at the next start (category "server"), with a message naming its training run and how to resume
it. Waiters are woken by an asyncio.Event per pending id. All methods run on the asyncio loop thread.

Ownership: the replicas of `serve --dp N` share one store, and a pending future lives in the memory of the
process that issued it. So each future records its owner, the replica id the supervisor gives each replica in
TINKERBELL_REPLICA_ID (stable across that replica's restarts). A restarting replica fails only its own pending
futures (and unowned ones, written before owners existed), never a live replica's; a standalone server (no
replica id) is the only process on its store and fails them all, as does the supervisor before it starts the
replicas. A poll reaching a replica other than the owner reads the shared store until the owner finishes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from tinkerbell.service.errors import Gone
from tinkerbell.service.store import Store

log = logging.getLogger("tinkerbell.futures")

PROTO = "application/x-protobuf"
JSON = "application/json"
RESTART_MESSAGE = "the server restarted while this request was running; submit it again"
# Set by the supervisor for each replica of `serve --dp N` (replica-0, replica-1, ...); unset: a standalone server.
REPLICA_ID_ENV = "TINKERBELL_REPLICA_ID"
# How often a poll for another replica's pending future re-reads the shared store.
FOREIGN_POLL_SECONDS = 0.25
# Finished futures are kept at least this long (tinker_api.md 3.2 asks for >= the session's life / 10 min).
RETENTION_SECONDS = 7 * 24 * 3600

Category = Literal["user", "server", "unknown"]


@dataclass
class Answer:
    """What retrieve_future sends for a finished future."""

    content_type: str
    body: bytes
    failed: bool


def failure_body(message: str, category: Category) -> bytes:
    return json.dumps({"error": message, "category": category}).encode()


def _unknown(request_id: str) -> Gone:
    return Gone(f"request_id {request_id!r} is unknown to this server (expired, or never issued to this API key); "
                "submit the request again")


def run_of(row: dict[str, Any]) -> tuple[str | None, str]:
    """(training run, phase) of a future, read from its dedupe key (runs.py writes `train|<run>|<seq_id>` for a
    run's numbered requests and `create|<run>` for its creation); (None, "other") for the rest."""
    key, prefix = row.get("dedupe_key") or "", f"{row.get('tenant')}|"
    if key.startswith(prefix):
        parts = key[len(prefix):].split("|")
        if parts[0] == "train" and len(parts) >= 3:
            return "|".join(parts[1:-1]), "train"
        if parts[0] == "create" and len(parts) >= 2:
            return "|".join(parts[1:]), "create"
    return None, "other"


def restart_message(row: dict[str, Any]) -> str:
    """What a future left pending by a process that stopped says: which run, and how to carry on."""
    who = row.get("owner")
    where = who if who else "the server"
    run, phase = run_of(row)
    if phase == "train":
        return (f"training run {run} lost this request: {where} restarted while it was running, and the run's "
                "in-memory state (its weights since the last save_state, optimizer moments) went with the process. "
                "Resume the run from its last saved state with ServiceClient."
                f"create_training_client_from_state_with_optimizer('tinker://{run}/weights/<name>') "
                f"(RestClient.list_checkpoints('{run}') lists its saves); the new run is placed on a live replica")
    if phase == "create":
        return (f"training run {run} was being created when {where} restarted; create the training client "
                "again (a new one is placed on a live replica)")
    if who:
        return f"{where} restarted while this request was running; submit it again"
    return RESTART_MESSAGE


def fail_left_over(store: Store, owner: str | None, everyone: bool = False) -> int:
    """Fail the pending futures a stopped process left: `owner`'s and unowned ones, or all when `everyone` (the
    store's only user is starting). Each gets restart_message. Returns how many were failed."""
    n = 0
    for row in store.pending_futures(owner, everyone=everyone):
        n += store.fail_future(row["request_id"], failure_body(restart_message(row), "server"))
    return n


class FutureRegistry:
    def __init__(self, store: Store, owner: str | None = None):
        """`owner`: this process's replica id; None reads TINKERBELL_REPLICA_ID (unset: a standalone server)."""
        self.store = store
        self.owner = owner if owner is not None else (os.environ.get(REPLICA_ID_ENV) or None)
        self._events: dict[str, asyncio.Event] = {}
        self.completed = 0
        self.failed = 0

    def recover_after_restart(self) -> int:
        """Fail the futures a previous process left pending (a replica: only its own), drop very old finished
        ones."""
        n = fail_left_over(self.store, self.owner, everyone=self.owner is None)
        self.store.purge_futures(time.time() - RETENTION_SECONDS)
        if n:
            log.warning("%d request(s) were running when %s stopped; they are reported failed", n,
                        self.owner or "the server")
        return n

    def _left_over(self, row: dict[str, Any]) -> bool:
        """A pending future no live process will finish: not in this process's memory, and ours (a previous
        incarnation's), unowned, or on a standalone server (the only process on the store)."""
        return self.owner is None or row["owner"] is None or row["owner"] == self.owner

    # ----------------------------------------------------------------------------------------- create

    def find(self, tenant: str, dedupe_key: str) -> str | None:
        """The request id already issued for this dedupe key, if any."""
        row = self.store.future_by_dedupe(f"{tenant}|{dedupe_key}")
        return row["request_id"] if row else None

    def create(self, tenant: str, kind: str, dedupe_key: str | None = None,
               extra: dict[str, Any] | None = None) -> tuple[str, bool, dict[str, Any] | None]:
        """(request_id, created, extra). A repeated dedupe_key returns the original id and its extra, created=False."""
        if dedupe_key is not None:
            dedupe_key = f"{tenant}|{dedupe_key}"  # tenants never share a dedupe space
            row = self.store.future_by_dedupe(dedupe_key)
            if row is not None:
                return row["request_id"], False, json.loads(row["extra"]) if row["extra"] else None
        request_id = "req-" + secrets.token_urlsafe(18)
        self.store.add_future(request_id, tenant, kind, dedupe_key, extra, owner=self.owner)
        self._events[request_id] = asyncio.Event()
        return request_id, True, extra

    # ----------------------------------------------------------------------------------------- finish

    def _finish(self, request_id: str, state: str, body: bytes, content_type: str) -> None:
        self.store.finish_future(request_id, state, body, content_type)
        ev = self._events.pop(request_id, None)
        if ev is not None:
            ev.set()

    def complete_json(self, request_id: str, result: dict[str, Any]) -> None:
        self.completed += 1
        self._finish(request_id, "done", json.dumps(result).encode(), JSON)

    def complete_proto(self, request_id: str, body: bytes) -> None:
        self.completed += 1
        self._finish(request_id, "done", body, PROTO)

    def fail(self, request_id: str, message: str, category: Category = "user") -> None:
        self.failed += 1
        self._finish(request_id, "failed", failure_body(message, category), JSON)

    def pending_count(self) -> int:
        return len(self._events)

    # ----------------------------------------------------------------------------------------- retrieve

    async def wait(self, request_id: str, tenant: str, timeout: float) -> Answer | None:
        """The answer once finished, or None after `timeout` seconds. Unknown (or another tenant's) id: Gone."""
        row = self.store.get_future(request_id)
        if row is None or row["tenant"] != tenant:
            raise _unknown(request_id)
        if row["state"] == "pending":
            ev = self._events.get(request_id)
            if ev is not None:
                try:
                    await asyncio.wait_for(ev.wait(), timeout)
                except asyncio.TimeoutError:
                    return None
            elif self._left_over(row):
                self.failed += 1
                self._finish(request_id, "failed", failure_body(restart_message(row), "server"), JSON)
            elif not await self._wait_foreign(request_id, timeout):
                return None  # another replica's future, still running there
            row = self.store.get_future(request_id)
            if row is None:
                raise _unknown(request_id)
        return Answer(content_type=row["content_type"] or JSON, body=bytes(row["result"] or b"{}"),
                      failed=row["state"] == "failed")

    async def _wait_foreign(self, request_id: str, timeout: float) -> bool:
        """Wait for another replica to finish its future (it writes the result to the shared store); True once
        finished, False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            row = self.store.get_future(request_id)
            if row is None or row["state"] != "pending":
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(FOREIGN_POLL_SECONDS, left))
