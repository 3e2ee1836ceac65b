"""Futures: the request ids every async endpoint hands out and `retrieve_future` long-polls on.

Results are stored pre-serialised (protobuf bytes for forward_backward and sample, JSON for the rest) in SQLite
the moment they are known, so a restart loses no finished future; a future still pending when the process
died is failed at the next start (category "server"). Waiters are woken by an asyncio.Event per pending id.
All methods run on the asyncio loop thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
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


class FutureRegistry:
    def __init__(self, store: Store):
        self.store = store
        self._events: dict[str, asyncio.Event] = {}
        self.completed = 0
        self.failed = 0

    def recover_after_restart(self) -> int:
        """Fail every future a previous process left pending; drop very old finished ones."""
        n = self.store.fail_pending_futures(failure_body(RESTART_MESSAGE, "server"))
        self.store.purge_futures(time.time() - RETENTION_SECONDS)
        if n:
            log.warning("%d request(s) were running when the server stopped; they are reported failed", n)
        return n

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
        self.store.add_future(request_id, tenant, kind, dedupe_key, extra)
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
            raise Gone(f"request_id {request_id!r} is unknown to this server (expired, or never issued to this API "
                       "key); submit the request again")
        if row["state"] == "pending":
            ev = self._events.get(request_id)
            if ev is None:
                # Pending in the store but not in memory: left over from a process that no longer exists.
                self.fail(request_id, RESTART_MESSAGE, "server")
            else:
                try:
                    await asyncio.wait_for(ev.wait(), timeout)
                except asyncio.TimeoutError:
                    return None
            row = self.store.get_future(request_id)
            assert row is not None
        return Answer(content_type=row["content_type"] or JSON, body=bytes(row["result"] or b"{}"),
                      failed=row["state"] == "failed")
