"""Replica state and the routing policy: least outstanding work, with stickiness where state lives.

Outstanding work of a replica, as the router sees it: requests it is proxying there now (long polls excluded:
they wait, they do not work) plus futures it handed out from there that no poll has collected yet. The
replica's own figure from /stats (which also counts work that bypassed the router) breaks ties.

Ownership (which replica holds a session's training runs, a sampler's weights in memory, an adapter in a LoRA
slot) is learnt from responses as they pass and from each replica's /stats (`live_runs`, `resident_adapters`),
so a restarted router relearns it within one health interval.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Generic, Iterable, TypeVar

K = TypeVar("K")
V = TypeVar("V")

# How long an uncollected future counts as outstanding work (clients that vanish never poll theirs).
PENDING_TTL_SECONDS = 600.0
# An adapter-resident replica is preferred unless it is this much busier than the least busy one.
AFFINITY_SLACK = 4
MAX_REMEMBERED = 200_000
# A replica whose process start time (now - uptime) moved later by more than this has restarted.
RESTART_SLACK_SECONDS = 2.0


class Lru(Generic[K, V]):
    """A bounded mapping: the least recently touched entries go first."""

    def __init__(self, capacity: int = MAX_REMEMBERED):
        self.capacity = capacity
        self._d: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: K, value: V) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


@dataclass
class Replica:
    index: int
    url: str
    healthy: bool = False
    requests_served: int = 0
    errors: int = 0
    in_flight: int = 0
    pending: dict[str, float] = field(default_factory=dict)  # tagged request id -> when handed out
    sessions_assigned: int = 0
    reported_outstanding: int = 0
    adapters: set[str] = field(default_factory=set)
    live_runs: set[str] = field(default_factory=set)
    model: str | None = None
    last_error: str | None = None
    last_check: float | None = None
    unhealthy_since: float | None = None
    started_at: float | None = None  # when the replica's process started (its /stats uptime), to notice restarts
    restarts: int = 0  # restarts the router noticed

    @property
    def outstanding(self) -> int:
        return self.in_flight + len(self.pending)

    def expire_pending(self, now: float) -> None:
        stale = [k for k, t in self.pending.items() if now - t > PENDING_TTL_SECONDS]
        for k in stale:
            del self.pending[k]

    def mark_down(self, why: str) -> bool:
        """Take the replica out; True when it was in."""
        was = self.healthy
        self.healthy = False
        self.last_error = why
        if was or self.unhealthy_since is None:
            self.unhealthy_since = time.time()
        return was

    def mark_up(self) -> bool:
        """Put the replica back; True when it was out."""
        was = self.healthy
        self.healthy = True
        self.unhealthy_since = None
        return not was

    def view(self) -> dict[str, Any]:
        return {"index": self.index, "url": self.url, "healthy": self.healthy,
                "requests_served": self.requests_served, "errors": self.errors,
                "outstanding": self.outstanding, "in_flight": self.in_flight, "pending_futures": len(self.pending),
                "replica_outstanding": self.reported_outstanding, "adapters": sorted(self.adapters),
                "live_runs": len(self.live_runs), "sessions_assigned": self.sessions_assigned,
                "last_error": self.last_error, "restarts": self.restarts,
                "last_check_age_s": None if self.last_check is None else round(time.time() - self.last_check, 2)}


class Pool:
    def __init__(self, urls: Iterable[str]):
        self.replicas = [Replica(i, u.rstrip("/")) for i, u in enumerate(urls)]
        if not self.replicas:
            raise ValueError("the router needs at least one replica")
        self.sessions: Lru[str, int] = Lru()
        self.runs: Lru[str, int] = Lru()
        self.samplers: Lru[str, int] = Lru()
        self.adapter_hint: Lru[str, int] = Lru(10_000)  # last replica an adapter's request went to
        self.base_models: set[str] = set()

    # ------------------------------------------------------------------------------------------ policy

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    def ranked(self, exclude: Iterable[int] = (), prefer: Iterable[int] = (), spread_sessions: bool = False,
               ) -> list[Replica]:
        """Replicas to try, best first: healthy before unhealthy (health may be stale; trying costs one failed
        connect), then preferred (adapter resident) unless much busier, then least outstanding work."""
        skip = set(exclude)
        cands = [r for r in self.replicas if r.index not in skip]
        if not cands:
            return []
        preferred = set(prefer)
        healthy = [r for r in cands if r.healthy]
        floor = min((r.outstanding for r in healthy), default=0)

        def key(r: Replica) -> tuple:
            affine = r.index in preferred and r.outstanding <= floor + AFFINITY_SLACK
            tie = r.sessions_assigned if spread_sessions else r.requests_served
            return (not r.healthy, not affine, r.outstanding, r.reported_outstanding, tie, r.index)

        return sorted(cands, key=key)

    def by_index(self, index: int | None) -> Replica | None:
        if index is None or not 0 <= index < len(self.replicas):
            return None
        return self.replicas[index]

    # ------------------------------------------------------------------------------------------ ownership

    def owner_of_run(self, model_id: str) -> Replica | None:
        r = self.by_index(self.runs.get(model_id))
        if r is not None:
            return r
        for rep in self.replicas:
            if model_id in rep.live_runs:
                self.runs.put(model_id, rep.index)
                return rep
        return None

    def owner_of_session(self, session_id: str) -> Replica | None:
        r = self.by_index(self.sessions.get(session_id))
        if r is not None:
            return r
        prefix = session_id + ":train:"
        for rep in self.replicas:
            if any(run.startswith(prefix) for run in rep.live_runs):
                self.sessions.put(session_id, rep.index)
                return rep
        return None

    def owner_of_sampler(self, sampler_id: str) -> Replica | None:
        return self.by_index(self.samplers.get(sampler_id))

    def holders_of_adapter(self, name: str) -> list[int]:
        out = [r.index for r in self.replicas if name in r.adapters]
        hint = self.adapter_hint.get(name)
        if hint is not None and hint not in out:
            out.append(hint)
        return out

    def note_session(self, session_id: str, replica: Replica) -> None:
        if self.sessions.get(session_id) != replica.index:
            replica.sessions_assigned += 1
        self.sessions.put(session_id, replica.index)

    # ------------------------------------------------------------------------------------------ health

    def apply_stats(self, replica: Replica, stats: dict[str, Any]) -> bool:
        """Fold a replica's /stats into its state (the fields the replica exposes for the router). True when the
        replica restarted since the last check: the futures it handed out died with the old process (their polls
        get the failure the new process recorded), so they no longer count as its outstanding work."""
        now = time.time()
        replica.last_check = now
        restarted = False
        uptime = stats.get("uptime_seconds")
        if isinstance(uptime, (int, float)):
            started = now - float(uptime)
            if replica.started_at is not None and started > replica.started_at + RESTART_SLACK_SECONDS:
                restarted = True
                replica.restarts += 1
                replica.pending.clear()
            replica.started_at = started
        replica.reported_outstanding = int(stats.get("outstanding") or 0)
        replica.adapters = set(stats.get("resident_adapters") or ())
        live = stats.get("live_runs")
        if isinstance(live, list):
            replica.live_runs = set(live)
            for run in live:
                self.runs.put(run, replica.index)
        if isinstance(stats.get("model"), str):
            replica.model = stats["model"]
            self.base_models.add(stats["model"])
        replica.expire_pending(now)
        return restarted

    def summary(self) -> dict[str, Any]:
        return {"total_workers": len(self.replicas), "healthy_workers": len(self.healthy()),
                "total_requests": sum(r.requests_served for r in self.replicas)}
