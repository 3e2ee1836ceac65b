"""SQLite persistence for everything the service must not lose: keys, sessions, runs, checkpoints, futures,
sampling sessions and metrics history.

One file, `<data-dir>/tinkerbell.db`, in WAL mode so readers (the console, `tinkerbell keys list` from another
process) never block the server. The server touches it only from its asyncio loop thread; the lock exists for
tests and embedders that call in from elsewhere. Writes are small and synchronous: SQLite in WAL mode commits
in well under a millisecond, cheaper than any thread hop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

DB_FILE = "tinkerbell.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY, tenant TEXT NOT NULL, prefix TEXT NOT NULL, created REAL NOT NULL,
    source TEXT NOT NULL DEFAULT 'created');
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created REAL NOT NULL, last_heartbeat REAL NOT NULL,
    finished REAL, finish_reason TEXT, finish_detail TEXT, tags TEXT, user_metadata TEXT, project_id TEXT,
    display_name TEXT, sdk_version TEXT);
CREATE TABLE IF NOT EXISTS runs (
    model_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, session_id TEXT, base_model TEXT NOT NULL,
    lora_rank INTEGER NOT NULL, train_attn INTEGER NOT NULL, train_mlp INTEGER NOT NULL,
    train_unembed INTEGER NOT NULL, seed INTEGER, optimizer TEXT, user_metadata TEXT, created REAL NOT NULL,
    last_request_time REAL NOT NULL, next_seq INTEGER NOT NULL DEFAULT 1, trainable INTEGER NOT NULL DEFAULT 1);
CREATE INDEX IF NOT EXISTS runs_tenant ON runs (tenant, created);
CREATE TABLE IF NOT EXISTS checkpoints (
    run TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, tenant TEXT NOT NULL, tinker_path TEXT NOT NULL,
    size_bytes INTEGER, created REAL NOT NULL, public INTEGER NOT NULL DEFAULT 0, expires_at REAL,
    user_metadata TEXT, PRIMARY KEY (run, kind, name));
CREATE INDEX IF NOT EXISTS checkpoints_tenant ON checkpoints (tenant, created);
CREATE TABLE IF NOT EXISTS sampling_sessions (
    sampler_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, session_id TEXT, base_model TEXT NOT NULL,
    model_path TEXT, adapter_key TEXT, adapter_dir TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
    result BLOB, content_type TEXT, created REAL NOT NULL, finished REAL, dedupe_key TEXT, extra TEXT,
    owner TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS futures_dedupe ON futures (dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS metrics (
    run TEXT NOT NULL, seq_id INTEGER NOT NULL, kind TEXT NOT NULL, time REAL NOT NULL, metrics TEXT NOT NULL,
    PRIMARY KEY (run, seq_id, kind));
CREATE TABLE IF NOT EXISTS lora_adapters (
    tenant TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (tenant, name));
"""


def now() -> float:
    return time.time()


def iso(ts: float | None) -> str | None:
    """ISO 8601 with an explicit offset: the SDK compares these with aware datetimes."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _dumps(v: Any) -> str | None:
    return None if v is None else json.dumps(v)


def _loads(v: str | None) -> Any:
    return None if v is None else json.loads(v)


class Store:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / DB_FILE
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate_futures()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ----------------------------------------------------------------------------------------- plumbing

    def _exec(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, tuple(args))

    def _one(self, sql: str, args: Iterable[Any] = ()) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(sql, tuple(args)).fetchone()
        return dict(row) if row is not None else None

    def _all(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, tuple(args)).fetchall()]

    # ----------------------------------------------------------------------------------------- keys

    def ensure_tenant(self, name: str) -> None:
        self._exec("INSERT OR IGNORE INTO tenants (name, created) VALUES (?, ?)", (name, now()))

    def add_key(self, key_hash: str, tenant: str, prefix: str, source: str) -> bool:
        """Insert a key; False if it was already there (its tenant is left as it was)."""
        self.ensure_tenant(tenant)
        cur = self._exec(
            "INSERT OR IGNORE INTO api_keys (key_hash, tenant, prefix, created, source) VALUES (?, ?, ?, ?, ?)",
            (key_hash, tenant, prefix, now(), source),
        )
        return cur.rowcount == 1

    def key_tenant(self, key_hash: str) -> str | None:
        row = self._one("SELECT tenant FROM api_keys WHERE key_hash = ?", (key_hash,))
        return row["tenant"] if row else None

    def list_keys(self) -> list[dict[str, Any]]:
        rows = self._all("SELECT tenant, prefix, created, source FROM api_keys ORDER BY created")
        for r in rows:
            r["created"] = iso(r["created"])
        return rows

    def count_keys(self) -> int:
        return int(self._one("SELECT COUNT(*) AS n FROM api_keys")["n"])  # type: ignore[index]

    # ----------------------------------------------------------------------------------------- sessions

    def add_session(self, session_id: str, tenant: str, tags: list[str], user_metadata: dict | None,
                    project_id: str | None, display_name: str | None, sdk_version: str | None) -> None:
        t = now()
        self._exec(
            "INSERT INTO sessions (session_id, tenant, created, last_heartbeat, tags, user_metadata, project_id,"
            " display_name, sdk_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (session_id, tenant, t, t, _dumps(tags), _dumps(user_metadata), project_id, display_name, sdk_version),
        )

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM sessions WHERE session_id = ?", (session_id,))
        if row:
            row["tags"] = _loads(row["tags"]) or []
            row["user_metadata"] = _loads(row["user_metadata"])
        return row

    def touch_session(self, session_id: str) -> None:
        self._exec("UPDATE sessions SET last_heartbeat = ? WHERE session_id = ?", (now(), session_id))

    def finish_session(self, session_id: str, reason: str | None, detail: str | None) -> None:
        # First reason wins: a repeated finish changes nothing.
        self._exec(
            "UPDATE sessions SET finished = ?, finish_reason = ?, finish_detail = ? "
            "WHERE session_id = ? AND finished IS NULL",
            (now(), reason, detail, session_id),
        )

    def list_sessions(self, tenant: str, limit: int, offset: int) -> list[str]:
        rows = self._all("SELECT session_id FROM sessions WHERE tenant = ? ORDER BY created DESC LIMIT ? OFFSET ?",
                         (tenant, limit, offset))
        return [r["session_id"] for r in rows]

    # ----------------------------------------------------------------------------------------- runs

    def add_run(self, model_id: str, tenant: str, session_id: str | None, base_model: str, lora_rank: int,
                train_attn: bool, train_mlp: bool, train_unembed: bool, seed: int | None, optimizer: dict,
                user_metadata: dict | None, trainable: bool = True) -> None:
        t = now()
        self._exec(
            "INSERT OR REPLACE INTO runs (model_id, tenant, session_id, base_model, lora_rank, train_attn, train_mlp,"
            " train_unembed, seed, optimizer, user_metadata, created, last_request_time, next_seq, trainable)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
            (model_id, tenant, session_id, base_model, lora_rank, int(train_attn), int(train_mlp),
             int(train_unembed), seed, _dumps(optimizer), _dumps(user_metadata), t, t, int(trainable)),
        )

    def _run_row(self, row: dict[str, Any] | None) -> dict[str, Any] | None:
        if row:
            row["optimizer"] = _loads(row["optimizer"]) or {"type": "adamw"}
            row["user_metadata"] = _loads(row["user_metadata"])
            for k in ("train_attn", "train_mlp", "train_unembed", "trainable"):
                row[k] = bool(row[k])
        return row

    def get_run(self, model_id: str) -> dict[str, Any] | None:
        return self._run_row(self._one("SELECT * FROM runs WHERE model_id = ?", (model_id,)))

    def list_runs(self, tenant: str, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        rows = self._all("SELECT * FROM runs WHERE tenant = ? ORDER BY created DESC LIMIT ? OFFSET ?",
                         (tenant, limit, offset))
        total = self._one("SELECT COUNT(*) AS n FROM runs WHERE tenant = ?", (tenant,))["n"]  # type: ignore[index]
        return [self._run_row(r) for r in rows], int(total)  # type: ignore[misc]

    def runs_of_session(self, session_id: str) -> list[str]:
        return [r["model_id"] for r in self._all("SELECT model_id FROM runs WHERE session_id = ? ORDER BY created",
                                                  (session_id,))]

    def touch_run(self, model_id: str, next_seq: int | None = None) -> None:
        if next_seq is None:
            self._exec("UPDATE runs SET last_request_time = ? WHERE model_id = ?", (now(), model_id))
        else:
            self._exec("UPDATE runs SET last_request_time = ?, next_seq = ? WHERE model_id = ?",
                       (now(), next_seq, model_id))

    def update_run_spec(self, model_id: str, lora_rank: int, train_attn: bool, train_mlp: bool,
                        train_unembed: bool) -> None:
        self._exec("UPDATE runs SET lora_rank = ?, train_attn = ?, train_mlp = ?, train_unembed = ? WHERE model_id = ?",
                   (lora_rank, int(train_attn), int(train_mlp), int(train_unembed), model_id))

    # ----------------------------------------------------------------------------------------- checkpoints

    def put_checkpoint(self, run: str, kind: str, name: str, tenant: str, tinker_path: str, size_bytes: int,
                       expires_at: float | None, user_metadata: dict | None) -> None:
        self._exec(
            "INSERT OR REPLACE INTO checkpoints (run, kind, name, tenant, tinker_path, size_bytes, created, public,"
            " expires_at, user_metadata) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
            (run, kind, name, tenant, tinker_path, size_bytes, now(), expires_at, _dumps(user_metadata)),
        )

    def _ckpt_row(self, row: dict[str, Any] | None) -> dict[str, Any] | None:
        if row:
            row["public"] = bool(row["public"])
            row["user_metadata"] = _loads(row["user_metadata"])
        return row

    def get_checkpoint(self, run: str, kind: str, name: str) -> dict[str, Any] | None:
        return self._ckpt_row(self._one("SELECT * FROM checkpoints WHERE run = ? AND kind = ? AND name = ?",
                                        (run, kind, name)))

    def delete_checkpoint(self, run: str, kind: str, name: str) -> None:
        self._exec("DELETE FROM checkpoints WHERE run = ? AND kind = ? AND name = ?", (run, kind, name))

    def list_checkpoints_of_run(self, run: str) -> list[dict[str, Any]]:
        return [self._ckpt_row(r) for r in  # type: ignore[misc]
                self._all("SELECT * FROM checkpoints WHERE run = ? ORDER BY created DESC, rowid DESC", (run,))]

    def list_checkpoints_of_tenant(self, tenant: str, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        rows = self._all("SELECT * FROM checkpoints WHERE tenant = ? ORDER BY created DESC, rowid DESC "
                         "LIMIT ? OFFSET ?", (tenant, limit, offset))
        total = self._one("SELECT COUNT(*) AS n FROM checkpoints WHERE tenant = ?", (tenant,))["n"]  # type: ignore
        return [self._ckpt_row(r) for r in rows], int(total)  # type: ignore[misc]

    def expired_checkpoints(self, at: float) -> list[dict[str, Any]]:
        return self._all("SELECT run, kind, name FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at <= ?",
                         (at,))

    def set_checkpoint_public(self, run: str, kind: str, name: str, public: bool) -> None:
        self._exec("UPDATE checkpoints SET public = ? WHERE run = ? AND kind = ? AND name = ?",
                   (int(public), run, kind, name))

    def set_checkpoint_expiry(self, run: str, kind: str, name: str, expires_at: float | None) -> None:
        self._exec("UPDATE checkpoints SET expires_at = ? WHERE run = ? AND kind = ? AND name = ?",
                   (expires_at, run, kind, name))

    # ----------------------------------------------------------------------------------------- samplers

    def add_sampler(self, sampler_id: str, tenant: str, session_id: str | None, base_model: str,
                    model_path: str | None, adapter_key: str | None, adapter_dir: str | None) -> None:
        self._exec(
            "INSERT OR REPLACE INTO sampling_sessions (sampler_id, tenant, session_id, base_model, model_path,"
            " adapter_key, adapter_dir, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (sampler_id, tenant, session_id, base_model, model_path, adapter_key, adapter_dir, now()),
        )

    def get_sampler(self, sampler_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM sampling_sessions WHERE sampler_id = ?", (sampler_id,))

    def samplers_of_session(self, session_id: str) -> list[str]:
        return [r["sampler_id"] for r in self._all(
            "SELECT sampler_id FROM sampling_sessions WHERE session_id = ? ORDER BY created", (session_id,))]

    # ----------------------------------------------------------------------------------------- futures

    def _migrate_futures(self) -> None:
        """Databases written before futures had an owner gain the column (their rows keep owner NULL: written
        by a process that no longer runs). Replicas of one `serve --dp N` may open the store at the same time,
        so losing the race to add the column is fine."""
        with self._lock:
            cols = {r["name"] for r in self._db.execute("PRAGMA table_info(futures)").fetchall()}
            if "owner" not in cols:
                try:
                    self._db.execute("ALTER TABLE futures ADD COLUMN owner TEXT")
                except sqlite3.OperationalError as e:
                    if "duplicate column" not in str(e):
                        raise
            # Startup recovery looks up one owner's pending futures; finished ones (nearly all rows) stay out.
            self._db.execute("CREATE INDEX IF NOT EXISTS futures_pending ON futures (owner) WHERE state = 'pending'")

    def add_future(self, request_id: str, tenant: str, kind: str, dedupe_key: str | None,
                   extra: dict | None = None, owner: str | None = None) -> None:
        self._exec(
            "INSERT INTO futures (request_id, tenant, kind, state, created, dedupe_key, extra, owner)"
            " VALUES (?, ?, ?, 'pending', ?, ?, ?, ?)",
            (request_id, tenant, kind, now(), dedupe_key, _dumps(extra), owner),
        )

    def future_by_dedupe(self, dedupe_key: str) -> dict[str, Any] | None:
        return self._one("SELECT request_id, tenant, kind, extra FROM futures WHERE dedupe_key = ?", (dedupe_key,))

    def finish_future(self, request_id: str, state: str, result: bytes, content_type: str) -> None:
        self._exec("UPDATE futures SET state = ?, result = ?, content_type = ?, finished = ? "
                   "WHERE request_id = ? AND state = 'pending'",
                   (state, result, content_type, now(), request_id))

    def get_future(self, request_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM futures WHERE request_id = ?", (request_id,))

    def pending_futures(self, owner: str | None, everyone: bool = False) -> list[dict[str, Any]]:
        """Pending futures of `owner` plus those with no owner (written by a process without a replica id, or
        before the column existed); every pending future when `everyone`."""
        cols = "request_id, tenant, kind, dedupe_key, owner"
        if everyone:
            return self._all(f"SELECT {cols} FROM futures WHERE state = 'pending'")
        return self._all(f"SELECT {cols} FROM futures WHERE state = 'pending' AND (owner IS NULL OR owner = ?)",
                         (owner,))

    def fail_future(self, request_id: str, result: bytes) -> bool:
        """Fail one pending future (a no-op once it finished); True when it was pending."""
        cur = self._exec("UPDATE futures SET state = 'failed', result = ?, content_type = 'application/json', "
                         "finished = ? WHERE request_id = ? AND state = 'pending'", (result, now(), request_id))
        return cur.rowcount == 1

    def purge_futures(self, finished_before: float) -> int:
        return self._exec("DELETE FROM futures WHERE finished IS NOT NULL AND finished < ?",
                          (finished_before,)).rowcount

    def future_counts(self) -> dict[str, int]:
        return {r["state"]: int(r["n"]) for r in self._all("SELECT state, COUNT(*) AS n FROM futures GROUP BY state")}

    # ----------------------------------------------------------------------------------------- metrics

    def add_metrics(self, run: str, seq_id: int, kind: str, metrics: dict[str, float]) -> None:
        self._exec("INSERT OR REPLACE INTO metrics (run, seq_id, kind, time, metrics) VALUES (?, ?, ?, ?, ?)",
                   (run, seq_id, kind, now(), json.dumps(metrics)))

    def metrics_of_run(self, run: str) -> list[dict[str, Any]]:
        rows = self._all("SELECT seq_id, kind, time, metrics FROM metrics WHERE run = ? ORDER BY seq_id", (run,))
        for r in rows:
            r["metrics"] = json.loads(r["metrics"])
        return rows

    # ----------------------------------------------------------------------------------------- named adapters

    def put_lora_adapter(self, tenant: str, name: str, path: str) -> None:
        """Register (or re-point) a PEFT folder under a name of the OpenAI face (`/v1/load_lora_adapter`)."""
        self._exec("INSERT OR REPLACE INTO lora_adapters (tenant, name, path, created) VALUES (?, ?, ?, ?)",
                   (tenant, name, path, now()))

    def get_lora_adapter(self, tenant: str, name: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM lora_adapters WHERE tenant = ? AND name = ?", (tenant, name))

    def delete_lora_adapter(self, tenant: str, name: str) -> bool:
        return self._exec("DELETE FROM lora_adapters WHERE tenant = ? AND name = ?", (tenant, name)).rowcount == 1

    def list_lora_adapters(self, tenant: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM lora_adapters WHERE tenant = ? ORDER BY created, name", (tenant,))
