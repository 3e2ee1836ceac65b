"""Client sessions: created by every ServiceClient, kept alive by heartbeats, finished on close.

Per-session counters (model_seq_id, sampling_session_seq_id) live in the client; the server only checks that a
session exists and belongs to the caller's tenant.
"""

from __future__ import annotations

import uuid
from typing import Any

from tinkerbell.service.errors import Gone, NotFound
from tinkerbell.service.store import Store


class SessionManager:
    def __init__(self, store: Store):
        self.store = store

    def create(self, tenant: str, tags: list[str], user_metadata: dict[str, Any] | None, project_id: str | None,
               display_name: str | None, sdk_version: str | None) -> str:
        # A bare UUID: session ids appear in URLs and inside model ids, so no ':' or '/'.
        session_id = str(uuid.uuid4())
        self.store.add_session(session_id, tenant, list(tags or []), user_metadata, project_id, display_name,
                               sdk_version)
        return session_id

    def require(self, tenant: str, session_id: str) -> dict[str, Any]:
        """The session's row; 404 when unknown or another tenant's."""
        row = self.store.get_session(session_id)
        if row is None or row["tenant"] != tenant:
            raise NotFound(f"session_id {session_id!r} is not a session of this API key; create one with "
                           "POST /api/v1/create_session (tinker.ServiceClient does this for you)")
        return row

    def heartbeat(self, tenant: str, session_id: str) -> None:
        row = self.store.get_session(session_id)
        if row is None or row["tenant"] != tenant:
            raise Gone(f"session_id {session_id!r} is unknown to this server")
        if row["finished"] is not None:
            raise Gone(f"session {session_id!r} was finished ({row['finish_reason'] or 'closed'})")
        self.store.touch_session(session_id)

    def finish(self, tenant: str, session_id: str, reason: str | None, detail: str | None) -> None:
        self.require(tenant, session_id)
        self.store.finish_session(session_id, reason, detail)

    def list(self, tenant: str, limit: int, offset: int) -> list[str]:
        return self.store.list_sessions(tenant, limit, offset)

    def describe(self, tenant: str, session_id: str) -> dict[str, Any]:
        row = self.require(tenant, session_id)
        meta = row["user_metadata"]
        return {
            "training_run_ids": self.store.runs_of_session(session_id),
            "sampler_ids": self.store.samplers_of_session(session_id),
            "user_metadata": {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else None,
            "display_name": row["display_name"],
        }
