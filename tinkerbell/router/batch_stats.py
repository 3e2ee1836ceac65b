"""`GET /batch/stats` behind the router: the batching figures of the whole deployment, with each replica's own.

A replica's /batch/stats (api/diffusion.py) describes its one batcher. Behind the router a user asks about the
service they talk to, so the router asks every replica and answers the sums: queue lengths and counters add up,
the batch-size histograms merge and the mean batch size is recomputed from the merged histogram. Settings
(`max_batch_size`, `max_wait_time`, `algorithm`) are per replica and the same on all of them when `serve --dp`
started them; they are reported as the replicas state them (the first answering replica's value, and
`replicas[i]` has each one's). A replica that is down or does not answer is listed with its error and left out
of the sums. (`GET /generation/algorithms` needs no such merge: every replica serves the same model and flags,
so the router forwards it to any one.)
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import httpx

from tinkerbell.router.pool import Replica

# Counters and queue lengths that add up over replicas; everything else is a per-replica setting.
ADDITIVE = frozenset({"pending_requests", "running_seqs", "waiting_seqs", "batches_run", "requests_finished",
                      "requests_failed", "tokens_generated", "steps", "forward_tokens", "forwards"})

Fetch = Callable[[Replica], Awaitable[httpx.Response]]


async def gather(replicas: list[Replica], fetch: Fetch) -> list[dict[str, Any]]:
    """Each replica's /batch/stats as a row: index, url, healthy, and its stats or the error."""

    async def one(rep: Replica) -> dict[str, Any]:
        row: dict[str, Any] = {"index": rep.index, "url": rep.url, "healthy": False, "error": None, "stats": None}
        if not rep.healthy:
            return row | {"error": "replica is unhealthy"}
        try:
            r = await fetch(rep)
        except httpx.HTTPError as e:
            return row | {"error": f"{type(e).__name__}: {e}"}
        if r.status_code != 200:
            return row | {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
        try:
            stats = r.json()
        except ValueError:
            return row | {"error": "the replica's answer is not JSON"}
        return row | {"healthy": True, "stats": stats if isinstance(stats, dict) else None}

    return list(await asyncio.gather(*(one(rep) for rep in replicas)))


def merge(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The deployment's figures from the replicas' rows (see the module docstring)."""
    answered = [r["stats"] for r in rows if r["stats"] is not None]
    out: dict[str, Any] = {}
    hist: dict[str, int] = {}
    for stats in answered:
        for key, value in stats.items():
            if key in ADDITIVE and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
            elif key == "batch_size_histogram" and isinstance(value, dict):
                for size, count in value.items():
                    hist[str(size)] = hist.get(str(size), 0) + int(count)
            elif key not in out and key != "mean_batch_size":
                out[key] = value
    if answered and any("batch_size_histogram" in s for s in answered):
        batches = sum(hist.values())
        out["batch_size_histogram"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
        out["mean_batch_size"] = sum(int(k) * v for k, v in hist.items()) / batches if batches else 0.0
    out["replicas"] = rows
    out["replicas_answering"] = len(answered)
    return out
